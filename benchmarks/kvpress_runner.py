"""The kvpress part of the accuracy benchmark. Runs inside its own virtual environment.

kvpress 0.5.5 needs ``transformers<5.3`` while the project runs transformers 5.24, so
``bench_accuracy.py`` creates ``.venv-kvpress`` (``torch==2.13.0 kvpress==0.5.5``) and runs this
file there as a subprocess: it reads a JSON job (token ids of every prompt, presses, budgets) and
writes a JSON result. It never imports the project.

Every system sees the same prompt token ids: the context is the engine's corpus block (chat
header + the haystack as a document), the question is the engine's question suffix. The ids go
through kvpress's own pipeline (``KVPressTextGenerationPipeline.forward``, i.e. the pipeline after
its text preprocessing): the press compresses the context during its prefill without seeing the
question, then the question and the answer are decoded greedily on the compressed cache.

One prefill serves every press and budget ("fan-out"): kvpress prunes a layer's cache in a forward
hook *after* that layer's prefill attention, so the hidden states of every layer, and with them
each press's input, are those of the uncompressed model whatever the press and its ratio. The
fan-out hook calls each press's own ``compress`` (kvpress's scoring and top-k pruning, with that
press's compression ratio) on the full keys/values of the layer, stores the result, and leaves the
cache uncompressed for the next layer. A press whose scores do not depend on its ratio (SnapKV,
ExpectedAttention, KNorm) is scored once per layer for all budgets, then pruned per budget as
``ScorerPress.compress`` does (``keep_top``). ``validate`` runs kvpress's pipeline itself, one prefill per
press and budget, on a few cases and compares the answers token for token.

Usage (inside .venv-kvpress): python kvpress_runner.py JOB.json RESULT.json
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

import kvpress
from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress
from kvpress.presses.base_press import BasePress, is_prefilling
from kvpress.utils import compute_n_kept, extract_keys_and_values

logger = logging.getLogger("kvpress_runner")

PRESSES = {
    "snapkv": SnapKVPress,
    "streamingllm": StreamingLLMPress,
    "expected_attention": ExpectedAttentionPress,
    "knorm": KnormPress,
}


# Presses whose ``score`` does not read their compression ratio (StreamingLLM's does): one score per
# layer serves every budget, then ScorerPress.compress's own top-k and gather per ratio.
RATIO_FREE_SCORES = (SnapKVPress, ExpectedAttentionPress, KnormPress)


def make_press(name: str, kv_budget: float):
    """kvpress's compression_ratio is the fraction removed: 1 - kv_budget."""
    return PRESSES[name](compression_ratio=round(1.0 - kv_budget, 10))


@dataclass
class FanOutPress(BasePress):
    """Runs several presses' ``compress`` on every layer of one prefill; leaves the cache whole."""

    presses: dict = field(default_factory=dict)  # key -> ScorerPress with its compression ratio

    def __post_init__(self):
        self.kept: dict = {key: {} for key in self.presses}  # key -> layer -> (keys, values)
        self.seconds: dict = {key: 0.0 for key in self.presses}

    def post_init_from_model(self, model):
        for press in self.presses.values():
            press.post_init_from_model(model)

    def forward_hook(self, module, input, kwargs, output):
        hidden_states = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        scores: dict = {}  # press class -> (this layer's scores, seconds the scoring took)
        for key, press in self.presses.items():
            start = time.perf_counter()
            if type(press) in RATIO_FREE_SCORES and press.compression_ratio > 0:
                if type(press) not in scores:
                    s = press.score(module, hidden_states, keys, values, output[1], kwargs)
                    scores[type(press)] = (s, time.perf_counter() - start)
                    start = time.perf_counter()
                s, score_s = scores[type(press)]
                self.kept[key][module.layer_idx] = keep_top(s, keys, values, press.compression_ratio)
                # every budget is charged the scoring, as a run of that press alone would be
                self.seconds[key] += score_s
            else:
                self.kept[key][module.layer_idx] = press.compress(module, hidden_states, keys, values, output[1], kwargs)
            self.seconds[key] += time.perf_counter() - start
        return output


def keep_top(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, compression_ratio: float):
    """``ScorerPress.compress`` after its ``score`` call (kvpress 0.5.5), line for line: keep the
    ``compute_n_kept`` best-scored keys/values of every head. ``run_validation`` checks the answers
    against kvpress's own pipeline."""
    n_kept = compute_n_kept(keys.shape[2], compression_ratio)
    indices = scores.topk(n_kept, dim=-1).indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()


def cache_from(layers: dict) -> DynamicCache:
    """A fresh DynamicCache holding the given per-layer (keys, values)."""
    cache = DynamicCache()
    for layer_idx in sorted(layers):
        k, v = layers[layer_idx]
        cache.update(k, v, layer_idx)
    return cache


def kv_bytes(layers: dict) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers.values())


@torch.inference_mode()
def generate_answer(pipe, question_ids, cache, context_length, max_new_tokens, stop_text=None):
    """kvpress's ``KVPressTextGenerationPipeline.generate_answer``, step for step, plus an optional
    early stop once ``stop_text`` appears (the expected value: stopping there cannot change a
    "contains the value" score). Returns (text, n_tokens, seconds to first token, total seconds)."""
    model = pipe.model
    start = time.perf_counter()
    position_ids = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    outputs = model(input_ids=question_ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=1)
    position_ids = position_ids[:, -1:] + 1
    generated_ids = [outputs.logits[0, -1].argmax()]
    ttft = time.perf_counter() - start
    stop_ids = model.generation_config.eos_token_id
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]

    def reached() -> bool:
        if stop_text is None:
            return False
        text = pipe.tokenizer.decode(torch.stack(generated_ids), skip_special_tokens=True)
        return stop_text.lower() in text.lower()

    if generated_ids[0].item() not in stop_ids and not reached():
        for i in range(max_new_tokens - 1):
            outputs = model(input_ids=generated_ids[-1].unsqueeze(0).unsqueeze(0), past_key_values=cache, position_ids=position_ids + i)
            new_id = outputs.logits[0, -1].argmax()
            generated_ids.append(new_id)
            if new_id.item() in stop_ids or reached():
                break
    text = str(pipe.tokenizer.decode(torch.stack(generated_ids), skip_special_tokens=True))
    return text, len(generated_ids), ttft, time.perf_counter() - start


@torch.inference_mode()
def fan_out_prefill(pipe, context_ids: torch.Tensor, press_keys: list[tuple[str, float]]):
    """One prefill with every (press, budget) hooked in. -> (full layers, FanOutPress, seconds)."""
    fan = FanOutPress(presses={key: make_press(*key) for key in press_keys})
    cache = DynamicCache()
    start = time.perf_counter()
    with fan(pipe.model) if press_keys else contextlib.nullcontext():
        pipe.model.model(input_ids=context_ids, past_key_values=cache)
    seconds = time.perf_counter() - start
    full = {l: extract_keys_and_values(cache, l) for l in range(len(cache.layers))}
    return full, fan, seconds


def run_cases(pipe, job: dict) -> tuple[list, list]:
    budgets, presses = job["budgets"], job["presses"]
    press_keys = [(p, b) for p in presses for b in budgets]
    answers, builds = [], []
    for n, case in enumerate(job["cases"], 1):
        context_ids = torch.tensor([case["context_ids"]])
        question_ids = torch.tensor([case["question_ids"]])
        full, fan, prefill_s = fan_out_prefill(pipe, context_ids, press_keys)
        builds.append({"case_id": case["case_id"], "prefill_seconds": prefill_s, "compress_seconds": {f"{p}@{b}": s for (p, b), s in fan.seconds.items()}})
        variants = [("none", 1.0, full)] + [(p, b, fan.kept[(p, b)]) for p, b in press_keys]
        for press, budget, layers in variants:
            text, n_tok, ttft, total = generate_answer(
                pipe, question_ids, cache_from(layers), context_ids.shape[1], case.get("max_new_tokens", job["max_new_tokens"]),
                stop_text=case["expected"] if job.get("early_stop", True) else None,
            )
            kept = layers[0][0].shape[2]
            answers.append({
                "case_id": case["case_id"], "press": press, "kv_budget": budget, "text": text,
                "completion_tokens": n_tok, "time_to_first_token": ttft, "total_time": total,
                "kept_tokens": kept, "context_tokens": int(context_ids.shape[1]),
                "kept_fraction": kept / context_ids.shape[1], "kv_bytes": kv_bytes(layers),
                "build_seconds": prefill_s + (fan.seconds[(press, budget)] if press != "none" else 0.0),
            })
        del full, fan
        logger.info("kvpress case %d/%d done", n, len(job["cases"]))
    return answers, builds


def run_validation(pipe, job: dict) -> list:
    """kvpress's own pipeline (one prefill per press and budget) against the fan-out, no early stop."""
    out = []
    for case in job.get("validate_cases", []):
        context_ids = torch.tensor([case["context_ids"]])
        question_ids = torch.tensor([case["question_ids"]])
        press_keys = [(p, b) for p in job["presses"] for b in job["validate_budgets"]]
        full, fan, _ = fan_out_prefill(pipe, context_ids, press_keys)
        for press, budget in press_keys:
            limit = case.get("max_new_tokens", job["max_new_tokens"])
            fan_text, *_ = generate_answer(pipe, question_ids, cache_from(fan.kept[(press, budget)]), context_ids.shape[1], limit)
            start = time.perf_counter()
            pipe_text = pipe.forward(
                {"context_ids": context_ids, "questions_ids": [question_ids]},
                press=make_press(press, budget), max_new_tokens=limit, cache=None,
            )[0]
            out.append({
                "case_id": case["case_id"], "press": press, "kv_budget": budget,
                "pipeline_answer": pipe_text, "fan_out_answer": fan_text, "equal": pipe_text == fan_text,
                "pipeline_seconds": time.perf_counter() - start,
            })
            logger.info("validate %s %s@%s equal=%s", case["case_id"], press, budget, pipe_text == fan_text)
    return out


@torch.inference_mode()
def run_fidelity(pipe, job: dict) -> list:
    """Next-token log-probs of a held-out continuation after the context, each press vs full KV."""
    out = []
    press_keys = [(p, b) for p in job["presses"] for b in job["budgets"]]
    for item in job.get("fidelity", []):
        context_ids = torch.tensor([item["context_ids"]])
        cont = torch.tensor([item["continuation_ids"][:-1]])
        n_ctx = context_ids.shape[1]
        positions = torch.arange(n_ctx, n_ctx + cont.shape[1]).unsqueeze(0)
        full, fan, _ = fan_out_prefill(pipe, context_ids, press_keys)

        def logprobs(layers):
            logits = pipe.model(input_ids=cont, past_key_values=cache_from(layers), position_ids=positions).logits[0]
            return torch.log_softmax(logits.float(), dim=-1)

        ref = logprobs(full)
        for press, budget in press_keys:
            lp = logprobs(fan.kept[(press, budget)])
            kl = (ref.exp() * (ref - lp)).sum(-1)
            out.append({
                "name": item["name"], "press": press, "kv_budget": budget, "tokens": int(cont.shape[1]),
                "top1_agreement": float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
                "mean_kl": float(kl.mean()),
            })
        out.append({"name": item["name"], "press": "none", "kv_budget": 1.0, "tokens": int(cont.shape[1]),
                    "full_top1": ref.argmax(-1).tolist()})
    return out


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    job_path, result_path = argv
    job = json.loads(open(job_path).read())
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    load_s = time.perf_counter() - start
    answers, builds = run_cases(pipe, job)
    validation = run_validation(pipe, job)
    fidelity = run_fidelity(pipe, job)

    result = {
        "answers": answers,
        "builds": builds,
        "validation": validation,
        "fidelity": fidelity,
        "load_seconds": load_s,
        "total_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        },
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
