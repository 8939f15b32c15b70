"""Merge a run's LoRA adapters into its backbone: a plain LLaDA directory, the frozen backbone of a later hybrid.

    python -m llada_trm.merge_adapters --adapters runs/block-sft/model --output_dir runs/block-sft-merged
    python train_llada_trm_hybrid_sft.py --model_name_or_path runs/block-sft-merged ...    # the head on it
    python -m llada_trm.frontier --backbone runs/block-sft-merged --points chunked/r1      # its decoders

`--adapters` is the `model/` directory of a `--use_lora` run (`--objective block_sft` or `llada_sft`): peft's
adapter files and the tokenizer. The base is the backbone the adapters name (`base_model_name_or_path`) unless
`--backbone` is given. The merged model (official layout: config.json + model.safetensors), the tokenizer and a
manifest are written beside the output and renamed into place, so an interrupted merge leaves no half directory.
Bad paths or arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llada_trm.cli import EXIT_USAGE, OneLineParser
from llada_trm.model.integrity import CheckpointMismatchError, save_model_directory
from llada_trm.model.loading import load_tokenizer
from llada_trm.model.modeling_llada import LLaDAModelLM

ADAPTER_CONFIG = "adapter_config.json"


def parse_args(argv: list[str] | None = None):
    parser = OneLineParser(prog="python -m llada_trm.merge_adapters", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--adapters", required=True, help="the model/ directory of a --use_lora run")
    parser.add_argument("--output_dir", required=True, help="the merged LLaDA directory to write")
    parser.add_argument("--backbone", default=None, help="base backbone (default: the one the adapters name)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="load, merge and save in this dtype (default: the loader's); bfloat16 for an 8B backbone")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    args = parser.parse_args(argv)
    adapter_config = Path(args.adapters) / ADAPTER_CONFIG
    if not adapter_config.is_file():
        parser.error(f"--adapters {args.adapters}: no {ADAPTER_CONFIG} (not the model/ directory of a --use_lora run)")
    if Path(args.output_dir).exists() and not args.overwrite:
        parser.error(f"--output_dir {args.output_dir} exists; pass --overwrite to replace it")
    return args


def merged_backbone(adapters: Path, backbone: str | None, dtype: str | None = None) -> LLaDAModelLM:
    """The base backbone with the adapters of `adapters` merged into its weights (peft's merge_and_unload)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ValueError("merging adapters needs the peft package: pip install peft") from None
    if backbone is None:
        backbone = json.loads((adapters / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not backbone:
            raise ValueError(f"{adapters / ADAPTER_CONFIG} names no base_model_name_or_path; pass --backbone")
    base = LLaDAModelLM.from_pretrained(backbone, **({"dtype": getattr(torch, dtype)} if dtype else {}))
    return PeftModel.from_pretrained(base, adapters).merge_and_unload().eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    adapters, output_dir = Path(args.adapters), Path(args.output_dir)
    try:
        model = merged_backbone(adapters, args.backbone, args.dtype)
        tokenizer = load_tokenizer(adapters)
    except (CheckpointMismatchError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return EXIT_USAGE
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    save_model_directory(model, tokenizer, output_dir)
    print(f"merged {adapters} into {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
