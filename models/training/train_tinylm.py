"""Train TinyLM, the byte-level demo language model served by Triton as `tinylm`.

Reads `models/data/corpus.txt` (Shakespeare), trains the transformer defined in
`models/repository/tinylm/1/tinylm_arch.py` on CPU for a fixed number of steps with a fixed
seed, and writes `models/repository/tinylm/1/tinylm.pt` (fp32 state_dict plus the
architecture hyper-parameters). Prints the final loss and a sample.

Each speech of the corpus (the blocks between blank lines) ends with the EOS token, so the
model learns to stop after a speech: generation can finish with "eos".

    python models/training/train_tinylm.py            # about 85 s on 2 idle cores
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from arch import load_arch  # the sibling models/training/arch.py

MODELS = Path(__file__).resolve().parents[1]
CORPUS = MODELS / "data" / "corpus.txt"
OUT = MODELS / "repository" / "tinylm" / "1" / "tinylm.pt"


arch = load_arch("tinylm")


def encode_corpus(text: str) -> torch.Tensor:
    """Bytes of the corpus, with EOS in place of the blank line that ends each speech."""
    ids: list[int] = []
    for speech in text.split("\n\n"):
        if speech.strip():
            ids.extend(speech.strip("\n").encode("utf-8") + b"\n")
            ids.append(arch.EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def batch(
    data: torch.Tensor, size: int, length: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - length - 1, (size, 1), generator=gen)
    window = data[starts + torch.arange(length + 1)]
    return window[:, :-1], window[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 * peak + 0.95 * peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: torch.Tensor, length: int) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(8):
        x, y = batch(data, 16, length, gen)
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


@torch.inference_mode()
def sample(
    model: torch.nn.Module, prompt: str, n: int, context: int, temperature: float, seed: int
) -> str:
    """Generate with the KV cache, exactly as the Triton model does."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([list(prompt.encode("utf-8"))])
    logits, kv = model(tokens)
    out: list[int] = []
    for _ in range(min(n, context - tokens.shape[1])):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        tok = int(torch.multinomial(probs, 1, generator=gen))
        if tok == arch.EOS_ID:
            break
        out.append(tok)
        logits, kv = model(torch.tensor([[tok]]), kv)
    return prompt + bytes(out).decode("utf-8", errors="replace")


@torch.inference_mode()
def check_kv_cache(model: torch.nn.Module, data: torch.Tensor) -> float:
    """Largest difference between cached step-by-step logits and one full forward."""
    seq = data[:64].unsqueeze(0)
    full, _ = model(seq)
    logits, kv = model(seq[:, :40])
    steps = [logits]
    for i in range(40, 64):
        logits, kv = model(seq[:, i : i + 1], kv)
        steps.append(logits)
    return float((torch.cat(steps, dim=1) - full).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=880)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=7e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop early (and say so) past this; off by default so that the result is the same "
        "on every machine",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = arch.TinyLMConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head)
    data = encode_corpus(CORPUS.read_text(encoding="utf-8"))
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    model = arch.TinyLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(data)} tokens ({split} train); model: {params} parameters; {cfg}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    start = time.monotonic()
    recent: list[float] = []
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=30)
        x, y = batch(train, args.batch_size, cfg.context_length, gen)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = [*recent[-19:], loss.item()]
        elapsed = time.monotonic() - start
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {elapsed:5.1f}s", flush=True)
        if args.max_seconds is not None and elapsed > args.max_seconds:
            print(f"stopping early after {step + 1} steps: past --max-seconds {args.max_seconds}")
            break

    train_secs = time.monotonic() - start
    model.eval()
    final = sum(recent) / len(recent)
    val_loss = evaluate(model, val, cfg.context_length)
    print(
        f"trained {step + 1} steps in {train_secs:.1f}s; final train loss (mean of last "
        f"{len(recent)} steps) {final:.3f} nats/byte, held-out loss {val_loss:.3f}"
    )
    print(f"kv-cache check: max |cached - full| logit difference {check_kv_cache(model, val):.2e}")
    arch.save_checkpoint(model, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    print("sample (temperature 0.8, seed 0):")
    print(sample(model, "ROMEO:\n", 240, cfg.context_length, 0.8, seed=0))


if __name__ == "__main__":
    main()
