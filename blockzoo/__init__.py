"""blockzoo package."""
