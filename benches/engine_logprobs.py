"""Output logprobs of `batchagent engine serve` against `transformers` on the same weights.

A random-weight model of Qwen2.5-0.5B's shape (24 layers, hidden 896; its vocabulary cut to a
byte-level BPE trained here, nothing can be downloaded) is served on the GPU in bf16 with CUDA
graphs, and in fp32. Concurrent `/v1/completions` requests (prompts of 20 to 400 token ids, 32
output tokens, `logprobs: 5`; half greedy, half sampled at temperature 0.8 with a seed) go over
HTTP. The reference is the same checkpoint in fp32 under `transformers`: the log-softmax of its
logits over each prompt followed by the engine's own output (teacher forcing). Written per dtype:
the absolute difference of each sampled token's logprob (max, p99, median), the share of positions
whose top-5 tokens (by text) are the reference's, and for greedy requests the share of positions
whose token is the reference's argmax; in bf16, also how far `transformers` itself in bf16 is from
the fp32 reference at the same positions (what the dtype alone costs).

    python benches/engine_logprobs.py --out benches/results/engine-logprobs-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_kv_engine import post

from batchagent_rs.engine import serve

VOCAB = 4096
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOP = 5
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def checkpoint(path: Path, seed: int) -> Any:
    """Writes the model and its tokenizer to `path`; returns the tokenizer."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator(corpus, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.05,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return tok


def requests(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(20, 400))]
        sampled = i % 2 == 1
        out.append({
            "prompt": prompt, "max_tokens": 32, "logprobs": TOP, "temperature": 0.8 if sampled else 0,
            "seed": i, "ignore_eos": True, "return_token_ids": True,
        })  # fmt: skip
    return out


def served(
    path: Path, device: str, dtype: str, bodies: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    server = serve.start(
        str(path), device=device, dtype=dtype, port=0, served_model_name="m", max_num_seqs=64
    )
    try:
        url = server.url + "/v1/completions"
        post(url, {**bodies[0], "model": "m", "max_tokens": 2})  # warm-up, outside the clock
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: post(url, {**b, "model": "m"})["choices"][0], bodies))
        return answers, time.perf_counter() - t0
    finally:
        server.stop()


def reference(model: Any, prompt: list[int], out: list[int]) -> torch.Tensor:
    """`model`'s log-softmax at each of `out`'s positions after `prompt`, in fp32."""
    with torch.inference_mode():
        ids = torch.tensor([prompt + out], device=model.device)
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(out) - 1]
        return torch.log_softmax(logits.float(), dim=-1)


def compare(
    model: Any, tok: Any, bodies: list[dict[str, Any]], answers: list[dict[str, Any]], same_dtype: Any = None
) -> dict[str, Any]:
    """The served logprobs against `model`'s (fp32). With `same_dtype` (the checkpoint under
    `transformers` in the engine's dtype), also that model's logprobs against fp32 at the same
    positions: what the dtype alone costs."""
    diffs: list[float] = []
    own: list[float] = []
    same_top = positions = greedy_positions = greedy_argmax = 0
    for body, choice in zip(bodies, answers, strict=True):
        prompt, out, lp = body["prompt"], choice["token_ids"], choice["logprobs"]
        ref = reference(model, prompt, out)
        low = reference(same_dtype, prompt, out) if same_dtype is not None else None
        top_ids = ref.topk(TOP, dim=-1).indices.tolist()
        for j, token in enumerate(out):
            positions += 1
            diffs.append(abs(lp["token_logprobs"][j] - ref[j, token].item()))
            if low is not None:
                own.append(abs(low[j, token].item() - ref[j, token].item()))
            texts = {tok.decode([i]) for i in top_ids[j]}
            # The served dict holds the sampled token and the top 5; the top 5 alone are its 5 best.
            served_top = sorted(lp["top_logprobs"][j].items(), key=lambda kv: -kv[1])[:TOP]
            same_top += {t for t, _ in served_top} == texts
            if body["temperature"] == 0:
                greedy_positions += 1
                greedy_argmax += token == top_ids[j][0]
    summary: dict[str, Any] = {"positions": positions, **spread("sampled_logprob_abs_diff", diffs)}
    if own:
        summary.update(spread("transformers_same_dtype_abs_diff", own))
    return {
        **summary,
        "top5_same_share": same_top / positions,
        "greedy_positions": greedy_positions,
        "greedy_token_is_reference_argmax_share": greedy_argmax / greedy_positions,
    }


def spread(name: str, values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        f"{name}_max": values[-1],
        f"{name}_p99": values[int(0.99 * (len(values) - 1))],
        f"{name}_median": statistics.median(values),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    result: dict[str, Any] = {
        "command": f"python benches/engine_logprobs.py --device {args.device} --dtypes {args.dtypes} "
        f"--requests {args.requests} --out {args.out}",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "model": "random weights, Qwen2.5-0.5B's shape, a 4,096-token byte-level BPE vocabulary",
        "reference": "transformers, fp32, the same checkpoint, teacher-forced on the engine's output",
        "requests": args.requests,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        tok = checkpoint(path, seed=3)
        bodies = requests(args.requests, seed=7)
        for dtype in args.dtypes.split(","):
            answers, seconds = served(path, args.device, dtype, bodies)
            torch.cuda.empty_cache()
            model = transformers.Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
            model = model.to(args.device).eval()
            low = None
            if dtype != "fp32":
                low = transformers.Qwen2ForCausalLM.from_pretrained(path, torch_dtype=DTYPES[dtype])
                low = low.to(args.device).eval()
            result[dtype] = {"seconds": seconds, **compare(model, tok, bodies, answers, low)}
            del model, low
            torch.cuda.empty_cache()
            print(dtype, json.dumps(result[dtype]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
