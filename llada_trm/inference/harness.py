"""The lm-evaluation-harness model `llada_trm`: the backbone or the hybrid, scored by the harness the field uses.

Importing this module registers the model with lm-eval (the optional `eval` extra); `python -m llada_trm.lm_eval`
is the harness's own command line with it registered. Model args (`--model_args k=v,...`, `MODEL_ARGS` below):
`checkpoint=DIR` (a hybrid) or `backbone=DIR` (a plain LLaDA, `tiny-llada` for the shipped one), `decoder=` any
frontier point name (`sampler/k1`, `sampler/t0.9`, `chunked/r1`, `hybrid/r4`, `hybrid/t0.9`, ...), `prompt_style=`
(`training` or `raw`), `gen_length=`, `block_length=`, `mc_num=`, `mc_batch_size=`, `seed=`, `greedy_check=`,
`chunk_size=`, `dtype=`; the harness's `--batch_size` and `--device` are taken too.

Notable:
- `generate_until` decodes exactly as `python -m llada_trm.evaluate` / `python -m llada_trm.frontier` do for the
  same point (the same decoders, settings and batching: requests in their order, grouped by task and budget, the
  sampler in batches of at least 32), then cuts the text before the first `until` string;
- `prompt_style=training` renders a harness prompt into the training layout (the question, the marker; a context
  already holding the marker is used as it is; few-shot examples before the last `Question:` are dropped, with a
  warning), and appends `#### <answer>` after a tagged answer so the harness's GSM8K filters read the answer the
  project's exact match reads; `raw` passes the harness text as it is (BOS first), for a plain instruct model;
- `loglikelihood` is LLaDA's Monte Carlo estimate of the masked-diffusion bound with the backbone
  (`inference.likelihood`); `loglikelihood_rolling` is a NotImplementedError naming the perplexity tasks;
- under `accelerate launch` the harness shards the requests by this model's `rank` / `world_size` and gathers the
  results through `all_gather` / `gather_object`; the decoding cost (new tokens and backbone row-passes, TPF) is
  counted per task and summed over processes into `get_model_info()`, so it lands in the results JSON.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from llada_trm.data.layout import MARKER, encode_prompt, extract_answer, render_prompt, text_ids
from llada_trm.inference.checkpoints import InferenceSetupError, load_for_inference
from llada_trm.inference.exact_match import SAMPLER_MIN_BATCH
from llada_trm.inference.frontier import BACKBONE_KINDS, FrontierPoint, PointError, parse_point, point_decoder
from llada_trm.inference.likelihood import is_greedy_continuation, masked_diffusion_loglikelihood
from llada_trm.inference.sampler import PassCounter
from llada_trm.model.integrity import CheckpointMismatchError
from llada_trm.model.loading import DeviceError, resolve_device

MODEL_NAME = "llada_trm"
PROMPT_STYLES = ("training", "raw")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BATCH_SIZE = 8  # when the harness gives none (Python API) or `auto`
DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default when a task names no budget
logger = logging.getLogger(__name__)
_latest_cost: dict | None = None  # the cost table of the last run in this process (for the command line)


class HarnessArgumentError(ValueError):
    """A model arg or request this model cannot take; the message names it."""


@dataclass
class ModelArgs:
    """What `--model_args` may set (None: the default the docstring of each field's use states)."""

    checkpoint: str | None = None  # a hybrid checkpoint directory
    backbone: str | None = None  # a plain LLaDA directory (or tiny-llada): backbone decoders only
    decoder: str | None = None  # a frontier point; default hybrid/r1 (checkpoint) or sampler/k1 (backbone)
    prompt_style: str = "training"  # training | raw
    gen_length: int | None = None  # a fixed new-token budget instead of each task's max_gen_toks
    block_length: int | None = None  # sampler points: block length (default chunk_size)
    chunk_size: int | None = None  # backbone=DIR: the chunk length of its fresh hybrid
    mc_num: int = 128  # Monte Carlo samples per loglikelihood request (LLaDA's evaluation uses 128)
    mc_batch_size: int = 32  # of those, how many per backbone forward
    seed: int = 1234  # the likelihood draws of every request start from it
    greedy_check: bool = True  # loglikelihood's is_greedy by decoding the continuation (False: always False)
    dtype: str | None = None  # float32 | bfloat16 | float16 (default: as saved)
    device: str | None = None  # default: cuda when available (under accelerate: the process's device)
    batch_size: int = DEFAULT_BATCH_SIZE  # prompts per decode (the harness's --batch_size)


INT_ARGS = {"gen_length": 1, "block_length": 1, "chunk_size": 1, "mc_num": 1, "mc_batch_size": 1, "seed": 0,
            "batch_size": 1}  # name -> smallest value
MODEL_ARGS = tuple(f.name for f in fields(ModelArgs))
IGNORED_ARGS = ("max_batch_size",)  # passed by the harness, meaningless here (no automatic batch size search)


def _as_int(name: str, value, smallest: int) -> int:
    try:
        number = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < smallest:
        raise HarnessArgumentError(f"model arg {name}={value!r}: expected an integer >= {smallest}")
    return number


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if str(value).strip().lower() not in words:
        raise HarnessArgumentError(f"model arg {name}={value!r}: expected true or false")
    return words[str(value).strip().lower()]


def parse_model_args(raw: dict) -> ModelArgs:
    """The harness's keyword arguments -> ModelArgs; an unknown name or a bad value is a HarnessArgumentError."""
    unknown = sorted(set(raw) - set(MODEL_ARGS) - set(IGNORED_ARGS))
    if unknown:
        raise HarnessArgumentError(f"unknown model arg(s) {', '.join(unknown)} for --model {MODEL_NAME}; "
                                   f"it takes {', '.join(MODEL_ARGS)}")
    values = {}
    for name, value in raw.items():
        if name in IGNORED_ARGS or value is None:
            continue
        if name == "batch_size" and str(value).startswith("auto"):
            logger.info("batch_size=%s: no automatic search here, decoding %d prompts at a time", value,
                        DEFAULT_BATCH_SIZE)
            continue
        if name in INT_ARGS:
            values[name] = _as_int(name, value, INT_ARGS[name])
        elif name == "greedy_check":
            values[name] = _as_bool(name, value)
        else:
            values[name] = str(value)
    args = ModelArgs(**values)
    if (args.checkpoint is None) == (args.backbone is None):
        raise HarnessArgumentError(f"--model {MODEL_NAME} needs exactly one of checkpoint=DIR (a hybrid) and "
                                   f"backbone=DIR (a plain LLaDA)")
    if args.prompt_style not in PROMPT_STYLES:
        raise HarnessArgumentError(f"model arg prompt_style={args.prompt_style!r}: expected one of {PROMPT_STYLES}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise HarnessArgumentError(f"model arg dtype={args.dtype!r}: expected one of {tuple(DTYPES)}")
    if args.chunk_size is not None and args.checkpoint is not None:
        raise HarnessArgumentError("model arg chunk_size= applies to backbone=DIR only (a checkpoint has its own)")
    return args


def decoder_point(name: str, chunk_size: int, has_head: bool, block_length: int | None) -> FrontierPoint:
    """A frontier point name -> FrontierPoint, checked against the model; errors name `decoder=`."""
    is_sampler = name.strip().startswith("sampler/")
    if block_length is not None and not is_sampler:
        raise HarnessArgumentError(f"model arg block_length= applies to sampler points, not decoder={name}")
    try:
        point = parse_point(name, block_length if is_sampler and block_length else chunk_size)
    except PointError as error:
        raise HarnessArgumentError(f"model arg decoder={name}: {error}") from error
    if not has_head and point.kind not in BACKBONE_KINDS:
        raise HarnessArgumentError(f"model arg decoder={name} needs a trained head (checkpoint=DIR); "
                                   f"backbone=DIR runs {' and '.join(BACKBONE_KINDS)} points only")
    return point


def training_prompt_text(context: str) -> tuple[str, bool]:
    """(the harness context in the training layout, whether few-shot text before the last question was dropped).

    A context with the marker is kept (ending with the marker's newline, as training prompts do); otherwise the text
    after the last `Question:` (or all of it), without a trailing `Answer:`, is rendered as the question.
    """
    if MARKER in context:
        text = context.rstrip(" ")
        return (text + "\n" if text.endswith(MARKER) else context), False
    before, found, question = context.rpartition("Question:")
    question = (question if found else context).strip()
    if question.endswith("Answer:"):
        question = question[: -len("Answer:")].strip()
    if not question:
        raise HarnessArgumentError(f"prompt_style=training: no question in the context {context[:80]!r}")
    return render_prompt(question), bool(found and before.strip())


def raw_prompt_ids(tokenizer, context: str) -> list[int]:
    """The harness text as it is, BOS first unless the text (a chat template's output) already starts with it."""
    ids = text_ids(tokenizer, context)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        raise HarnessArgumentError("an empty context and a tokenizer without BOS: nothing to condition on")
    return ids


def cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest of the `until` strings."""
    cuts = [text.find(stop) for stop in until if stop]
    cuts = [cut for cut in cuts if cut >= 0]
    return text[: min(cuts)] if cuts else text


def request_budget(gen_kwargs: dict, fixed: int | None) -> tuple[list[str], int]:
    """(until strings, new-token budget) of a generate_until request; sampling is refused (greedy decoders)."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
        raise HarnessArgumentError(f"the {MODEL_NAME} decoders are greedy (temperature 0); the task asks for "
                                   f"do_sample={kwargs.get('do_sample')}, temperature={kwargs.get('temperature')}")
    budget = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kwargs.get(k)),
                  DEFAULT_MAX_GEN_TOKS)
    return until, fixed if fixed is not None else _as_int("max_gen_toks", budget, 1)


def _new_cost() -> dict:
    return {"requests": 0, "new_tokens": 0, "backbone_passes": 0, "likelihood_requests": 0,
            "likelihood_row_passes": 0}


def merge_costs(parts: list[dict]) -> dict:
    """Per-task cost dicts of several processes -> their sums, with TPF (new tokens per backbone row-pass)."""
    total: dict[str, dict] = {}
    for part in parts:
        for task, cost in part.items():
            into = total.setdefault(task, _new_cost())
            for key in into:
                into[key] += cost.get(key, 0)
    for cost in total.values():
        cost["tokens_per_pass"] = cost["new_tokens"] / cost["backbone_passes"] if cost["backbone_passes"] else 0.0
    return total


def format_cost_table(cost: dict) -> str:
    """Per task: generation requests, new tokens, backbone row-passes, TPF, and the likelihood row-passes."""
    header = ("task", "requests", "new tokens", "backbone passes", "TPF", "likelihood passes")
    lines = [header] + [(task, str(c["requests"]), str(c["new_tokens"]), str(c["backbone_passes"]),
                         f"{c['tokens_per_pass']:.2f}", str(c["likelihood_row_passes"])) for task, c in cost.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rows = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) + " |"
            for line in lines]
    rows.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(rows)


def latest_cost() -> dict | None:
    """The summed per-task cost of the last harness call in this process (None before any)."""
    return _latest_cost


def _accelerator():
    """An Accelerator when launched with several processes (accelerate launch / torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator()
    return accelerator if accelerator.num_processes > 1 else None


@register_model(MODEL_NAME)
class LLaDATRMHarnessModel(LM):
    """`--model llada_trm`: a hybrid checkpoint or a plain LLaDA through the project's decoders (module docstring)."""

    def __init__(self, **model_args):
        super().__init__()
        self.args = parse_model_args(model_args)
        self.accelerator = _accelerator()
        if self.accelerator is not None:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            self._device = self.accelerator.device
        else:
            self._device = self._resolve_device(self.args.device)
        source = "checkpoint" if self.args.checkpoint is not None else "backbone"
        try:
            model, self.tokenizer = load_for_inference(self.args.checkpoint, self.args.backbone, None,
                                                       self.args.chunk_size)
        except (InferenceSetupError, CheckpointMismatchError, OSError) as error:
            raise HarnessArgumentError(f"model arg {source}=: {' '.join(str(error).split())}") from error
        if self.args.dtype is not None:
            model = model.to(DTYPES[self.args.dtype])
        self.model = model.to(self._device).eval()
        chunk_size = self.model.config.chunk_size
        default = "hybrid/r1" if self.args.checkpoint is not None else "sampler/k1"
        self.point = decoder_point(self.args.decoder or default, chunk_size, self.args.checkpoint is not None,
                                   self.args.block_length)
        self.block_length = self.args.block_length or chunk_size
        self._cost: dict[str, dict] = {}  # this process's, per task
        self.cost: dict[str, dict] = {}  # summed over processes after each call
        self._warned_few_shot = False

    @staticmethod
    def _resolve_device(spec: str | None) -> torch.device:
        """The device to run on. The harness's command line asks for cuda:0 unless told otherwise: without CUDA,
        that (or any CUDA device) falls back to the CPU with a warning, as the harness's own models do."""
        if spec is not None and spec.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %s: no CUDA device here, running on the CPU", spec)
            spec = "cpu"
        try:
            return torch.device(resolve_device(spec))
        except DeviceError as error:
            raise HarnessArgumentError(f"model arg device=: {error}") from error

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, context: str) -> list[int]:
        """The token ids a decoder continues for a harness context, in this model's prompt style."""
        if self.args.prompt_style == "raw":
            return raw_prompt_ids(self.tokenizer, context)
        text, dropped = training_prompt_text(context)
        if dropped and not self._warned_few_shot:
            logger.warning("prompt_style=training keeps the last question of a few-shot context (training saw "
                           "one question); run with --num_fewshot 0 to score what training saw")
            self._warned_few_shot = True
        return encode_prompt(self.tokenizer, text)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.args.prompt_style != "raw":
            raise HarnessArgumentError("--apply_chat_template needs prompt_style=raw: prompt_style=training renders "
                                       "the training layout itself")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    # ------------------------------------------------------------------ generation

    def _sampler_budget(self, prompts: list[list[int]], budget: int) -> int:
        """The budget, capped to what fits after the widest padded prompt (the sampler refuses more)."""
        block = self.block_length
        width = max(-(-len(p) // block) * block for p in prompts)
        room = (self.model.backbone.config.max_sequence_length - width) // block * block
        if room < block:
            raise HarnessArgumentError(f"a prompt of {max(map(len, prompts))} tokens leaves no room for a block of "
                                       f"{block} in max_sequence_length "
                                       f"{self.model.backbone.config.max_sequence_length}")
        return min(budget, room)

    def decode(self, prompts: list[list[int]], budget: int) -> tuple[list[str], list[int], int]:
        """(texts, new tokens per row, backbone row-passes) of one batch with this model's decoder point."""
        budget = self._sampler_budget(prompts, budget) if self.point.kind == "sampler" else budget
        batch = point_decoder(self.point, self.model, self.tokenizer, budget, self.block_length)(prompts)
        return batch.texts, batch.new_tokens, batch.backbone_row_passes

    def finish(self, text: str, until: list[str]) -> str:
        """The returned continuation: cut before `until`; in the training layout, `#### answer` after a tagged one."""
        text = cut_at_stops(text, until)
        answer = extract_answer(text) if self.args.prompt_style == "training" else None
        return text if answer is None else f"{text}\n#### {answer}"

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        parsed = [(req.args[0], *request_budget(req.args[1], self.args.gen_length), req.task_name) for req in requests]
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, budget, task) in enumerate(parsed):
            groups.setdefault((task, budget), []).append(i)
        size = self.args.batch_size if self.point.kind != "sampler" else max(self.args.batch_size, SAMPLER_MIN_BATCH)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0)
        for (task, budget), indices in groups.items():
            cost = self._cost.setdefault(str(task), _new_cost())
            for start in range(0, len(indices), size):
                batch = indices[start:start + size]
                texts, new_tokens, passes = self.decode([self.prompt_ids(parsed[i][0]) for i in batch], budget)
                for i, text in zip(batch, texts):
                    results[i] = self.finish(text, parsed[i][1])
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                cost["requests"] += len(batch)
                cost["new_tokens"] += sum(new_tokens)
                cost["backbone_passes"] += passes
                bar.update(len(batch))
        bar.close()
        self._gather_cost()
        return results

    # ------------------------------------------------------------------ likelihood

    def likelihood_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): trailing spaces of the context move to the continuation (the harness's
        convention), the context in this model's prompt style (BOS alone when empty), left-truncated to fit."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.prompt_ids(context) if context.strip() else raw_prompt_ids(self.tokenizer, "")
        continuation_ids = text_ids(self.tokenizer, continuation)
        limit = self.model.backbone.config.max_sequence_length
        if len(continuation_ids) >= limit:
            raise HarnessArgumentError(f"a continuation of {len(continuation_ids)} tokens does not fit the "
                                       f"max_sequence_length {limit} with any context")
        return context_ids[-(limit - len(continuation_ids)):], continuation_ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        backbone, results = self.model.backbone, []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm or self.rank != 0):
            context_ids, continuation_ids = self.likelihood_pair(*req.args)
            counter = PassCounter()
            if not continuation_ids:
                result = (0.0, True)
            else:
                value = masked_diffusion_loglikelihood(backbone, context_ids, continuation_ids, self.args.mc_num,
                                                       self.args.seed, self.args.mc_batch_size, counter)
                greedy = self.args.greedy_check and is_greedy_continuation(backbone, context_ids, continuation_ids,
                                                                           counter)
                result = (value, bool(greedy))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            cost = self._cost.setdefault(str(req.task_name), _new_cost())
            cost["likelihood_requests"] += 1
            cost["likelihood_row_passes"] += counter.backbone_row_passes
        self._gather_cost()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            f"--model {MODEL_NAME} does not implement loglikelihood_rolling, the request type of perplexity tasks "
            f"(wikitext, pile, ...): a masked-diffusion LM has no left-to-right likelihood; score multiple-choice "
            f"(loglikelihood) and generation (generate_until) tasks")

    # ------------------------------------------------------------------ distributed

    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        return self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _gather_cost(self) -> None:
        """Sum the per-task cost over processes (every process calls each request type, padded by the harness)."""
        global _latest_cost
        parts = [self._cost]
        if self.world_size > 1:
            parts = [None] * self.world_size
            torch.distributed.all_gather_object(parts, self._cost)
        self.cost = merge_costs(parts)
        _latest_cost = self.cost

    def get_model_info(self) -> dict:
        """What the harness writes into results["config"]: the model, decoder and settings, and the cost per task."""
        settings = {k: v for k, v in asdict(self.args).items() if v is not None}
        return {MODEL_NAME: {**settings, "decoder": self.point.name, "decoding_cost": self.cost}}
