"""Build the toy world's models (seeded, CPU) and write them where the demo config expects them.

    python -m rgpo.models.mindomni.build_toy_world --out rgpo/assets/toyworld

Four stages, all on MindOmni's own classes at toy size (see :mod:`rgpo.toyworld` for the world):

1. VAE: an AutoencoderKL (factor 4) learns to reconstruct the world's 32x32 pictures; its scaling factor is
   set so latents have unit variance, as SDXL's is.
2. VLM SFT: the Qwen2.5-VL learns the think/answer format on TRAIN prompts from imperfect teachers: the sum
   slips, the colour is wrong and the format breaks at fixed rates, so the starting policy is right only part
   of the time. The answer always follows the chain's own reasoning.
3. Decoder side (MindOmni's stage 1/2): the connector and the OmniGen decoder learn, by flow matching, to draw
   the picture a chain's ANSWER describes from the frozen VLM's hidden states of the whole conversation
   (prompt + chain up to ``</answer>`` + the closing newline), exactly the condition RGPO samples with. Chains
   here take every colour x shape pair as their answer, so the decoder can draw held-out pairs while the VLM
   never saw a held-out prompt.
4. CLIP: a tiny open_clip trained contrastively on the world's pictures and descriptions (the consistency
   reward's judge).

Writes ``<out>/model/`` (MindOmni's released layout), ``<out>/clip.safetensors``, ``<out>/train.jsonl``,
``<out>/heldout.jsonl`` and ``<out>/build.json`` (settings, timings, the figures each stage reached).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rgpo import toyworld as world

from .modeling import MindOmni, cat_left_padded
from .tiny import build_tiny_mindomni

SIZES = dict(
    vlm_hidden=96, vlm_layers=3, vlm_heads=4, vlm_kv_heads=2, vlm_intermediate=192, vision_hidden=32,
    vision_depth=1, dec_hidden=96, dec_layers=3, dec_heads=4, dec_intermediate=192, time_step_dim=64,
    pos_embed_max_size=16, vae_channels=(16, 32, 32), vocab_size=640,
)  # fmt: skip
IMAGE_SIZE = 32


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def _optimizer_step(loss: torch.Tensor, optimizer, schedule, params, max_norm: float | None = 1.0) -> None:
    """One step; gradients clipped to ``max_norm`` (None: not clipped)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    schedule.step()


def _pixels(images) -> torch.Tensor:
    import numpy as np

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


# ------------------------------------------------------------------------------------------------ 1. VAE
def train_vae(model: MindOmni, steps: int, seed: int, log) -> dict:
    vae = model.vae
    images, _ = world.pictures(per_pair=120, seed=seed, size=IMAGE_SIZE)
    x_all = _pixels(images)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = _schedule(optimizer, steps)
    vae.train()
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (64,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        # A light KL keeps the latent space smooth enough for the decoder to model; MSE does the rest.
        loss = F.mse_loss(rec, x) + 1e-5 * posterior.kl().mean()
        _optimizer_step(loss, optimizer, schedule, vae.parameters(), max_norm=None)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x).latent_dist.mean for x in x_all[:1024].split(256)])
        rec = vae.decode(means[:256]).sample
    scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=scale)
    return {"steps": steps, "reconstruction_mse": float(F.mse_loss(rec, x_all[:256])), "scaling_factor": scale}


# ------------------------------------------------------------------------------------------------ 2. VLM SFT
SFT_ERRORS = dict(p_sum=0.4, p_colour=0.4, p_format=0.15)


def sft_vlm(model: MindOmni, steps: int, batch: int, seed: int, log) -> dict:
    rng = random.Random(seed)
    train = world.prompts("train")
    vlm = model.vlm
    vlm.train()
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    schedule = _schedule(optimizer, steps)
    for step in range(steps):
        rows = [rng.choice(train) for _ in range(batch)]
        texts = [world.sft_chain(p, rng, **SFT_ERRORS) for p in rows]
        prompts = model.build_prompts([{"prompt": p.prompt} for p in rows])
        completions = model.completions_from_texts(texts)
        logps = model.forward_text(prompts, completions, with_condition=False).logps
        mask = completions.completion_mask.float()
        loss = -(logps * mask).sum() / mask.sum()
        _optimizer_step(loss, optimizer, schedule, params)
        if step % 100 == 0 or step == steps - 1:
            log(f"sft step {step}: loss {loss.item():.4f}")
    vlm.eval()
    return {"steps": steps, "batch": batch, "errors": SFT_ERRORS, "final_loss": float(loss.detach())}


# ------------------------------------------------------------------------------------------------ 3. decoder
def _decoder_conversations(count: int, seed: int) -> tuple[list[world.ToyPrompt], list[str], list[tuple[str, str]]]:
    """Train prompts with chains whose answer is a uniformly drawn pair (the reasoning made to fit it)."""
    rng = random.Random(seed)
    train = world.prompts("train")
    rows, texts, answers = [], [], []
    for _ in range(count):
        p = rng.choice(train)
        colour, shape = rng.choice(list(world.COLOURS)), rng.choice(world.SHAPES)
        broken = rng.choice(["no_think_close", "no_answer_tags"]) if rng.random() < 0.1 else None
        rows.append(p)
        texts.append(world.chain(p, corners=world.CORNERS[shape], colour=colour, broken=broken))
        answers.append((colour, shape))
    return rows, texts, answers


@torch.no_grad()
def _conditions(model: MindOmni, rows, texts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(rows), 64):
        prompts = model.build_prompts([{"prompt": p.prompt} for p in rows[start : start + 64]])
        completions = model.completions_from_texts(texts[start : start + 64])
        fwd = model.forward_text(prompts, completions, with_condition=True)
        out += [c[m.bool()] for c, m in zip(fwd.condition, fwd.condition_mask)]
    return out


def train_decoder(model: MindOmni, steps: int, batch: int, seed: int, log) -> dict:
    rows, texts, answers = _decoder_conversations(4096, seed)
    states = _conditions(model, rows, texts)
    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    images, captions = world.pictures(per_pair=64, seed=seed + 1, size=IMAGE_SIZE)
    with torch.no_grad():
        vae = model.vae
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in _pixels(images).split(256)])
        latents = latents * vae.config.scaling_factor
    by_pair = {pair: [] for pair in pairs}
    for k, caption in enumerate(captions):
        by_pair[tuple(caption.split()[1:])].append(k)
    by_pair = {pair: torch.tensor(ks) for pair, ks in by_pair.items()}
    gen = torch.Generator().manual_seed(seed)
    params = [*model.connector.parameters(), *model.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = _schedule(optimizer, steps)
    model.connector.train()
    model.decoder.train()
    for step in range(steps):
        pick = torch.randint(len(rows), (batch,), generator=gen).tolist()
        cond, mask = cat_left_padded([states[i][None] for i in pick],
                                     [torch.ones(1, len(states[i]), dtype=torch.long) for i in pick])
        x1 = torch.stack([latents[by_pair[answers[i]][torch.randint(len(by_pair[answers[i]]), (1,), generator=gen)]][0]
                          for i in pick])
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(batch, generator=gen)
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        velocity = model.decode_step(model.connect(cond, mask), mask, xt, t).velocity
        loss = F.mse_loss(velocity.float(), x1 - x0)
        _optimizer_step(loss, optimizer, schedule, params)
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step}: flow loss {loss.item():.4f}")
    model.connector.eval()
    model.decoder.eval()
    return {"steps": steps, "batch": batch, "conversations": len(rows), "final_loss": float(loss.detach())}


# ------------------------------------------------------------------------------------------------ 4. CLIP
def train_clip(steps: int, seed: int, out: Path, log) -> dict:
    from safetensors.torch import save_file

    from rgpo.rewards.clip import train_tiny_clip

    images, captions = world.pictures(per_pair=60, seed=seed + 2, size=IMAGE_SIZE)
    bundle = train_tiny_clip(images, captions, steps=steps, seed=seed, batch_size=128)
    state = {k: v.detach().contiguous() for k, v in bundle.model.state_dict().items()}
    save_file(state, str(out / "clip.safetensors"))
    # Ranking check on fresh pictures: how often an image's own description scores highest.
    test_images, test_captions = world.pictures(per_pair=10, seed=seed + 3, size=IMAGE_SIZE)
    unique = list(dict.fromkeys(test_captions))
    with torch.no_grad():
        img = bundle.model.encode_image(torch.stack([bundle.preprocess(i) for i in test_images]), normalize=True)
        txt = bundle.model.encode_text(bundle.tokenizer(unique), normalize=True)
        top = (img @ txt.T).argmax(1)
    accuracy = float(sum(unique[k] == c for k, c in zip(top.tolist(), test_captions)) / len(test_captions))
    log(f"clip: top-1 description accuracy on fresh pictures {accuracy:.3f}")
    return {"steps": steps, "top1_accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="rgpo/assets/toyworld")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    report: dict = {"seed": args.seed, "sizes": SIZES}  # tuples are written as JSON arrays
    model = build_tiny_mindomni(args.seed, corpus=world.corpus(), **SIZES)
    model.system_prompt = world.SYSTEM_PROMPT
    model.instruction_prefix = world.INSTRUCTION_PREFIX
    model.negative_prompt = world.NEGATIVE_PROMPT
    timings = {}
    for name, stage in (
        ("vae", lambda: train_vae(model, args.vae_steps, args.seed, log)),
        ("sft", lambda: sft_vlm(model, args.sft_steps, 32, args.seed, log)),
        ("decoder", lambda: train_decoder(model, args.decoder_steps, 48, args.seed, log)),
        ("clip", lambda: train_clip(args.clip_steps, args.seed, out, log)),
    ):
        t0 = time.perf_counter()
        report[name] = stage()
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"{name} done in {timings[name]} s: {report[name]}")
    model.save_pretrained(str(out / "model"))
    world.write_jsonl(world.prompts("train"), out / "train.jsonl")
    world.write_jsonl(world.prompts("heldout"), out / "heldout.jsonl")
    report["seconds"] = timings
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["command"] = "python -m rgpo.models.mindomni.build_toy_world " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}/ in {report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
