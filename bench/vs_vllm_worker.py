"""vLLM side of bench/vs_vllm.py: runs under the vLLM venv's python (never imports qnext).

Reads a JSON job on stdin: {"model", "max_new_tokens", "max_num_seqs", "rounds", "warmup": [ids...],
"runs": {"N": [ids...]}} (prompts as token-id lists), builds one offline `LLM`, does one untimed warm-up generate,
then `rounds` times one timed `LLM.generate` per run, and prints one line `RESULT_PREFIX + JSON`: per run the wall
seconds of each round, the generated tokens and the generated token ids of each prompt (of the last round).
vLLM's own logging goes to stdout and stderr as it likes; the parent keys on the prefix.
"""

from __future__ import annotations

import json
import sys
import time

RESULT_PREFIX = "VS_VLLM_RESULT "


def generate(llm, sampling, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Wall seconds of one `LLM.generate` over all prompts at once, and each prompt's generated ids."""
    inputs = [{"prompt_token_ids": p} for p in prompts]
    start = time.perf_counter()
    outs = llm.generate(inputs, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              max_num_seqs=job["max_num_seqs"], seed=0)
    sampling = SamplingParams(**job.get("sampling", {"temperature": 0.0}), max_tokens=job["max_new_tokens"],
                              ignore_eos=True, detokenize=False)
    generate(llm, sampling, job["warmup"])
    runs = {n: {"seconds": []} for n in job["runs"]}
    for _ in range(job["rounds"]):
        for n, prompts in job["runs"].items():
            seconds, ids = generate(llm, sampling, prompts)
            runs[n] |= {"tokens": sum(map(len, ids)), "token_ids": ids}
            runs[n]["seconds"].append(seconds)
    import torch
    import vllm
    info = {"vllm": vllm.__version__, "torch": torch.__version__}
    print(RESULT_PREFIX + json.dumps({"runs": runs, "info": info}), flush=True)


if __name__ == "__main__":
    main()
