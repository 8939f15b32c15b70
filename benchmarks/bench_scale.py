"""Training and decoding cost at a named LLaDA shape, side by side in one process, on random weights.

    python benchmarks/bench_scale.py --shape tiny                       # CPU, a minute or two
    python benchmarks/bench_scale.py --shape 8b --device cuda           # one 80 GB GPU
    python benchmarks/bench_scale.py --shape 8b --count_flops           # counted FLOPs, any CPU (count_scale.py)

The backbone is built directly on the device in the backbone dtype (bf16 on CUDA, fp32 on CPU by default) with
random weights: no download, and timings do not depend on the values. The hybrid is the 8B config's recipe
(configs/llada8b_natural_reasoning.yaml, or `--recipe`; head in fp32, width min(d_model, 1024)); on CUDA the
hybrid step runs under bf16 autocast, as training does.

Rows (batch `--batch_size` of a `--prompt_length` prompt + `--num_chunks` chunks of 16):
- backbone forward, no grad (block-causal, the hybrid's first stage);
- hybrid training step: frozen backbone, head forward + backward through all steps, AdamW on the head;
- naive per-chunk loop (`--skip_naive` to leave it out: it costs about K/2 full passes);
- LLaDA SFT, full backbone forward + backward with gradient checkpointing (no optimizer step: at 8B the AdamW
  states do not fit next to the weights);
- LLaDA SFT with LoRA r=16 on q, k, v, attn_out (peft), gradient checkpointing, full step with AdamW;
then decoding `--new_tokens` tokens at batch 1 and `--decode_batch` (ignore_eos, so every row decodes them all):
- LLaDA `generate`, one token per step, blocks of `--block_length`;
- `generate_with_refinement`, 1 round per chunk; the same with the backbone only; the same with 4 rounds.
Training rows show the ratio to the backbone forward and to the LoRA step, and memory: on CUDA the peak allocated
above what was resident, everywhere the tensors autograd saved for backward. On CPU, tokens/s and all ratios use
the process CPU time (`--threads` 1 by default), which a machine shared with other jobs does not inflate. Decoding rows show tokens/s and
the ratio to LLaDA `generate` at the same batch. Each row: `--warmup` untimed runs, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's llada_trm, not an installed one
from bench_train_step import naive_step  # noqa: E402
from timing import SavedTensorMeter, describe_machine, time_call  # noqa: E402

from llada_trm.pretrain import build_config  # noqa: E402
from llada_trm.pretrain import parse_args as pretrain_defaults  # noqa: E402
from llada_trm.data.collator import positions_in_masked_chunks  # noqa: E402
from llada_trm.embedded.assets import TINY_LLADA_PATH  # noqa: E402
from llada_trm.inference.chunk_decoding import generate_with_refinement  # noqa: E402
from llada_trm.inference.sampler import generate  # noqa: E402
from llada_trm.model.configuration_hybrid import HybridConfig  # noqa: E402
from llada_trm.model.configuration_llada import LLaDAConfig  # noqa: E402
from llada_trm.model.hybrid import LLaDATRMHybrid  # noqa: E402
from llada_trm.model.modeling_llada import LLaDAModelLM  # noqa: E402
from llada_trm.training.arguments import hybrid_config, parse_arguments  # noqa: E402
from llada_trm.training.diffusion import forward_mask, llada_sft_loss  # noqa: E402

# Official LLaDA-8B fields (docs/architecture.md §1). `1b` is a mid-size LLaDA-shaped model of this project (not a checkpoint).
LLADA_SPECIAL = dict(eos_token_id=126081, pad_token_id=126081, bos_token_id=126080, mask_token_id=126336)
SHAPES = {
    "8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
               embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0, **LLADA_SPECIAL),
    "1b": dict(d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16, mlp_hidden_size=5632, vocab_size=126464,
               embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0, **LLADA_SPECIAL),
}
# Per-shape defaults: (batch, prompt length, chunks, new tokens, decode batch). The tiny shape is cut so that a
# CPU run stays short; the large shapes use the sizes of the table.
SIZES = {"tiny": (4, 32, 8, 64, 8), "1b": (4, 128, 32, 256, 8), "8b": (4, 128, 32, 256, 8)}
CHUNK = 16
CONFIG_8B = Path(__file__).resolve().parent.parent / "configs" / "llada8b_natural_reasoning.yaml"


def config_of_8b_recipe(path: Path | None = None, max_recursive_steps: int | None = None) -> HybridConfig:
    """The HybridConfig the training program builds from the 8B config, or from the config at `path` (its backbone
    is not loaded); `max_recursive_steps` overrides the config's (min_recursive_steps follows it down)."""
    config = hybrid_config(parse_arguments(["--config", str(path or CONFIG_8B)], environ={}).model)
    if max_recursive_steps:
        config.max_recursive_steps = max_recursive_steps
        config.min_recursive_steps = min(config.min_recursive_steps, max_recursive_steps)
    return config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "1b", "8b"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="backbone dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--prompt_length", type=int, default=None, help="a multiple of 16")
    parser.add_argument("--num_chunks", type=int, default=None)
    parser.add_argument("--max_recursive_steps", type=int, default=None,
                        help="refinement steps (default: the 8B config's, or --recipe's)")
    parser.add_argument("--new_tokens", type=int, default=None, help="a multiple of --block_length")
    parser.add_argument("--block_length", type=int, default=32, help="LLaDA generate's block length")
    parser.add_argument("--decode_batch", type=int, default=None, help="the larger decoding batch (the other is 1)")
    parser.add_argument("--skip_naive", action="store_true")
    parser.add_argument("--skip_sft", action="store_true", help="leave out both SFT rows (and the LoRA ratios)")
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--skip_train", action="store_true", help="decoding rows only")
    parser.add_argument("--count_flops", action="store_true",
                        help="print counted FLOPs instead of timings (CPU, shapes only: benchmarks/count_scale.py)")
    parser.add_argument("--skip_levers", action="store_true",
                        help="with --count_flops: the 8B config's step alone, not one row per lever changed")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="the training config whose hybrid is timed or counted (default: the 8B config)")
    parser.add_argument("--count_all_layers", action="store_true",
                        help="with --count_flops: count every layer instead of 1 and 2 extended linearly")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    batch, prompt, chunks, new_tokens, decode_batch = SIZES[args.shape]
    args.batch_size = args.batch_size or batch
    args.prompt_length = args.prompt_length or prompt
    args.num_chunks = args.num_chunks or chunks
    args.new_tokens = args.new_tokens or new_tokens
    args.decode_batch = args.decode_batch or decode_batch
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.count_flops:
        args.device, args.dtype = "cpu", "float32"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.prompt_length % CHUNK or args.new_tokens % args.block_length or args.new_tokens % CHUNK:
        parser.error("--prompt_length must be a multiple of 16 and --new_tokens of 16 and of --block_length")
    return args


# ---------------------------------------------------------------------------------------------- setup

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def shape_config(shape: str) -> LLaDAConfig:
    if shape == "tiny":  # the shipped tiny-llada's shape, with its tokenizer's special tokens
        return build_config(AutoTokenizer.from_pretrained(TINY_LLADA_PATH), pretrain_defaults([]))
    return LLaDAConfig(**SHAPES[shape])


def build_backbone(config: LLaDAConfig, device: str, dtype: torch.dtype) -> LLaDAModelLM:
    """Random weights, created on the device in the backbone dtype (no fp32 copy of an 8B model on the way)."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        return LLaDAModelLM(config).eval()


def training_batch(config: LLaDAConfig, args, device: str) -> dict:
    """Random tokens: a prompt (chunk_index -1), `num_chunks` reasoning chunks, 30 % of them masked."""
    g = torch.Generator().manual_seed(0)
    batch, length = args.batch_size, args.prompt_length + args.num_chunks * CHUNK
    ids = torch.randint(0, min(config.vocab_size, config.mask_token_id), (batch, length), generator=g)
    chunk_index = torch.cat([torch.full((args.prompt_length,), -1),
                             torch.arange(args.num_chunks).repeat_interleave(CHUNK)]).expand(batch, -1)
    labels = torch.where(chunk_index >= 0, ids, torch.full_like(ids, -100))
    chunk_is_masked = torch.rand(batch, args.num_chunks, generator=g) < 0.3
    masked_here = positions_in_masked_chunks(chunk_index, chunk_is_masked)
    inputs = torch.where(masked_here, torch.full_like(ids, config.mask_token_id), ids)
    out = dict(input_ids=inputs, attention_mask=torch.ones_like(ids), chunk_index=chunk_index.contiguous(),
               labels=labels, chunk_is_masked=chunk_is_masked)
    return {k: v.to(device) for k, v in out.items()}


def prompts(config: LLaDAConfig, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, min(config.vocab_size, config.mask_token_id), (batch, length), generator=g)


# --------------------------------------------------------------------------------------------- timing

@dataclass
class Row:
    name: str
    ms: float
    tokens: int  # tokens per call (training: real tokens; decoding: new tokens)
    cpu_ms: float = 0.0  # process CPU time: on a CPU shared with other jobs, steadier than wall time
    peak_mib: float | None = None
    saved_mib: float | None = None
    group: str = "train"  # train or the decoding batch ("b1", "b8", ...)

    basis: str = "wall"  # the clock of tokens/s and of the ratios: "cpu" on a CPU device, else "wall"

    @property
    def time(self) -> float:
        return self.cpu_ms if self.basis == "cpu" else self.ms

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.time / 1000)


def measure(name: str, fn, tokens: int, args, group: str = "train", saved_mib: float | None = None) -> Row:
    for _ in range(args.warmup):
        fn()
    walls, cpus, peaks = [], [], []
    for _ in range(args.repeats):
        wall, cpu, peak = time_call(fn, args.device)
        walls.append(wall)
        cpus.append(cpu)
        peaks.append(peak)
    peak = max(peaks) if peaks[0] is not None else None
    row = Row(name, statistics.median(walls), tokens, statistics.median(cpus), peak, saved_mib, group,
              basis="cpu" if args.device == "cpu" else "wall")
    print(f"  measured {name}: {row.ms:.1f} ms", file=sys.stderr)
    return row


def saved_by(fn, *modules) -> float:
    with SavedTensorMeter(*modules) as meter:
        fn()
    return meter.mib


def autocast(device: str):
    """bf16 autocast on CUDA, as `--mixed_precision bf16` trains; nothing on CPU (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- training

def training_rows(model: LLaDATRMHybrid, batch: dict, args) -> list[Row]:
    device, tokens = args.device, int(batch["attention_mask"].sum())
    backbone = model.backbone

    def backbone_forward():
        with torch.no_grad():
            model.backbone_hidden_states(batch["input_ids"], batch["attention_mask"], batch["chunk_index"])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def hybrid_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    def hybrid_forward():
        with autocast(device):
            model(**batch).loss

    rows = [measure("backbone forward, no grad", backbone_forward, tokens, args),
            measure("hybrid training step (frozen backbone, AdamW on head)", hybrid_step, tokens, args,
                    saved_mib=saved_by(hybrid_forward, model))]
    if not args.skip_naive:
        def naive():
            with autocast(device):
                naive_step(model, optimizer, batch, backbone.config.pad_token_id)

        rows.append(measure(f"naive per-chunk loop ({args.num_chunks} chunks)", naive, tokens, args))
    if not args.skip_sft:
        rows += sft_rows(backbone, batch, args)
    return rows


def sft_loss(backbone: LLaDAModelLM, batch: dict, generator: torch.Generator):
    is_response = batch["labels"] != -100
    targets = batch["labels"].where(is_response, batch["input_ids"])
    noisy, is_masked, p_mask = forward_mask(targets, is_response, backbone.config.mask_token_id, generator)
    logits = backbone(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
    return llada_sft_loss(logits, targets, is_masked, p_mask, is_response)


def sft_rows(backbone: LLaDAModelLM, batch: dict, args) -> list[Row]:
    """Full fine-tuning (forward + backward) and LoRA (full step). They change the backbone in place (gradients
    on, adapters injected), so they run after everything that uses the frozen backbone."""
    device, tokens = args.device, int(batch["attention_mask"].sum())
    generator = torch.Generator(device=device).manual_seed(0)
    backbone.requires_grad_(True).train()
    backbone.gradient_checkpointing_enable()

    def full_sft():
        backbone.zero_grad(set_to_none=True)
        sft_loss(backbone, batch, generator).backward()

    rows = [measure("LLaDA SFT, full forward+backward (grad ckpt, no AdamW)", full_sft, tokens, args,
                    saved_mib=saved_by(lambda: sft_loss(backbone, batch, generator), backbone))]
    backbone.zero_grad(set_to_none=True)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("peft is not installed: no LoRA row", file=sys.stderr)
        return rows
    lora = get_peft_model(backbone, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "attn_out"]))
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    def lora_step():
        optimizer.zero_grad(set_to_none=True)
        sft_loss(lora, batch, generator).backward()
        optimizer.step()

    rows.append(measure("LLaDA SFT, LoRA r=16 (q,k,v,attn_out), full step", lora_step, tokens, args,
                        saved_mib=saved_by(lambda: sft_loss(lora, batch, generator), lora)))
    return rows


# ------------------------------------------------------------------------------------------- decoding

def decoding_rows(model: LLaDATRMHybrid, args) -> list[Row]:
    rows, n = [], args.new_tokens
    config = model.backbone.config
    for batch in sorted({1, args.decode_batch}):
        ids = prompts(config, batch, args.prompt_length).to(args.device)
        group = f"b{batch}"

        def refinement(**options):
            return lambda: generate_with_refinement(model, ids, max_new_tokens=n, ignore_eos=True, **options)

        methods = {
            f"LLaDA generate ({n} steps, blocks of {args.block_length})": lambda: generate(
                model.backbone, ids, steps=n, gen_length=n, block_length=args.block_length),
            "generate_with_refinement, 1 round per chunk": refinement(),
            "same, backbone only (enable_refinement=False)": refinement(enable_refinement=False),
            "same with refinement, 4 rounds per chunk": refinement(decode_steps_per_chunk=4),
        }
        for name, fn in methods.items():
            rows.append(measure(f"{name}, batch {batch}", fn, batch * n, args, group=group))
    return rows


# ---------------------------------------------------------------------------------------------- table

def find(rows: list[Row], prefix: str, group: str = "train") -> Row | None:
    return next((r for r in rows if r.name.startswith(prefix) and r.group == group), None)


def print_table(rows: list[Row], device: str) -> None:
    """Wall time; on CPU also the process CPU time, on which tokens/s and the ratios are then based (one torch
    thread: CPU time is the work done, wall time adds whatever else the machine was running)."""
    forward, lora = find(rows, "backbone forward"), find(rows, "LLaDA SFT, LoRA")
    cpu_header = f"{'CPU ms':>10}" if device == "cpu" else ""
    print(f"{'row':<66}{'ms':>10}{cpu_header}{'tokens/s':>11}{'x fwd':>8}{'x LoRA':>8}{'peak MiB':>10}"
          f"{'saved MiB':>11}")
    for row in (r for r in rows if r.group == "train"):
        ratio_forward = f"{row.time / forward.time:.2f}" if forward else "-"
        ratio_lora = f"{row.time / lora.time:.2f}" if lora else "-"
        peak = f"{row.peak_mib:.0f}" if row.peak_mib is not None else "-"
        saved = f"{row.saved_mib:.1f}" if row.saved_mib is not None else "-"
        cpu = f"{row.cpu_ms:>10.1f}" if device == "cpu" else ""
        print(f"{row.name:<66}{row.ms:>10.1f}{cpu}{row.tokens_per_s:>11.0f}{ratio_forward:>8}{ratio_lora:>8}"
              f"{peak:>10}{saved:>11}")
    groups = sorted({r.group for r in rows if r.group != "train"}, key=lambda g: int(g[1:]))
    if groups:
        print(f"\n{'decoding':<66}{'ms':>10}{cpu_header}{'tokens/s':>11}{'x LLaDA generate':>18}")
    for group in groups:
        baseline = find(rows, "LLaDA generate", group)
        for row in (r for r in rows if r.group == group):
            cpu = f"{row.cpu_ms:>10.1f}" if device == "cpu" else ""
            print(f"{row.name:<66}{row.ms:>10.1f}{cpu}{row.tokens_per_s:>11.1f}"
                  f"{row.tokens_per_s / baseline.tokens_per_s:>17.2f}x")


def print_goals(rows: list[Row], decode_batch: int) -> None:
    """The issue's targets at the 8b shape, with the values of this run (meaningful at that shape only)."""
    forward, hybrid, lora = find(rows, "backbone forward"), find(rows, "hybrid training"), find(rows, "LLaDA SFT, LoRA")
    lines = [f"hybrid step / backbone forward   {hybrid.time / forward.time:6.2f}   (goal <= 1.5, counted)"]
    if lora:
        lines.append(f"hybrid step / LoRA step          {hybrid.time / lora.time:6.2f}   (goal <= 0.5)")
        if hybrid.peak_mib is not None and lora.peak_mib:
            ratio = hybrid.peak_mib / lora.peak_mib
            lines.append(f"hybrid peak / LoRA peak          {ratio:6.2f}   (goal <= 0.25, saved)")
    for batch, goal in ((1, 20), (decode_batch, 40)):
        llada = find(rows, "LLaDA generate", f"b{batch}")
        refined = find(rows, "generate_with_refinement, 1 round", f"b{batch}")
        if llada and refined:
            lines.append(f"refinement / LLaDA generate, batch {batch:<3}{refined.tokens_per_s / llada.tokens_per_s:6.2f}"
                         f"   (goal >= {goal})")
    print("\ngoals (stated for the 8b shape):\n  " + "\n  ".join(lines))


def main() -> None:
    args = parse_args()
    if args.count_flops:
        import count_scale

        return count_scale.main(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renaming of gradient checkpointing
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    config = shape_config(args.shape)
    backbone = build_backbone(config, args.device, dtype)
    model = LLaDATRMHybrid(config_of_8b_recipe(args.recipe, args.max_recursive_steps), backbone=backbone).train()
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.02)  # a trained-looking head (out_proj starts at 0)
    parts = model.num_parameters_by_part()
    batch = training_batch(config, args, args.device)
    print(describe_machine(args))
    print(f"shape {args.shape}: d_model {config.d_model}, {config.n_layers} layers, vocab {config.vocab_size}, "
          f"{parts['backbone'] / 1e6:.1f}M backbone params in {args.dtype} (random); head width "
          f"{model.config.head_hidden_size}, {parts['head'] / 1e6:.1f}M params in fp32; the 8B config's recipe "
          f"({args.recipe or CONFIG_8B.name}): {model.config.max_recursive_steps} refinement steps of "
          f"{model.config.latent_steps} latent updates")
    print(f"training batch {args.batch_size} x ({args.prompt_length} prompt + {args.num_chunks} chunks of {CHUNK}) = "
          f"{batch['input_ids'].shape[1]} tokens; decoding {args.new_tokens} new tokens after a {args.prompt_length}-token "
          f"prompt; median of {args.repeats} after {args.warmup} warm-up\n")
    rows = []
    if not args.skip_decode:  # first: the SFT rows change the backbone in place
        model.eval()
        rows += decoding_rows(model, args)
        model.train()
    if not args.skip_train:
        rows = training_rows(model, batch, args) + rows
    print_table(rows, args.device)
    if not args.skip_train:
        print_goals(rows, args.decode_batch)


if __name__ == "__main__":
    main()
