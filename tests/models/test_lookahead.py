"""The runner's lookahead (ModelRunner.execute): each step's likely successor is launched before the host has its
tokens, and the next step uses the rows it matches. Run on the CPU path here (on a GPU it is the default, with
CUDA graphs; tests/gpu compares that path with the eager one): the tokens must equal those of plain steps
while requests finish, join, cross block boundaries and are recomputed after a preemption."""
import torch
from test_llama_vs_hf import BLOCK_SIZE, NUM_BLOCKS, build_hf, prompt

from ember.config import EngineConfig
from ember.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from ember.runner.model_runner import ModelRunner
from ember.sampling_params import SamplingParams


def run_script(runner: ModelRunner, slots_ahead: int) -> tuple[dict[str, list[int]], list[int]]:
    """A scripted schedule, each request given blocks for its tokens and `slots_ahead` more (as the scheduler
    with KVCacheManager.num_lookahead_slots); returns each request's tokens and the lookahead rows used at each
    step."""
    prompts = {"a": prompt(9, seed=1), "b": prompt(14, seed=2), "c": prompt(6, seed=3)}
    generated = {i: [] for i in prompts}
    free_blocks = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0)).tolist()
    blocks = {i: [] for i in prompts}
    params = {"a": SamplingParams(temperature=0), "b": SamplingParams(temperature=0),
              "c": SamplingParams(temperature=0.8, seed=5)}  # a seeded sampled request: its generator is per request
    # (request, "prefill" | "decode" | "recompute") per step; a finishes after step 3, c joins at 4, b is
    # preempted and recomputed at 8.
    script = ([[("a", "prefill"), ("b", "prefill")]] + [[("a", "decode"), ("b", "decode")]] * 3
              + [[("b", "decode"), ("c", "prefill")]] + [[("b", "decode"), ("c", "decode")]] * 3
              + [[("c", "decode"), ("b", "recompute")]] + [[("b", "decode"), ("c", "decode")]] * 3)
    used = []
    for step, entries in enumerate(script):
        scheduled = []
        for i, kind in entries:
            known = prompts[i] + generated[i]
            if kind == "recompute":
                blocks[i] = []
            start = len(known) - 1 if kind == "decode" else 0
            while len(blocks[i]) * BLOCK_SIZE < len(known) + slots_ahead:
                blocks[i].append(free_blocks.pop())
            scheduled.append(ScheduledRequest(i, known[start:], start, blocks[i], True, params[i], prompts[i], generated[i]))
        finished = {"a"} if step == 4 else set()
        before = runner.num_lookahead_rows_used
        sampled = runner.execute(SchedulerOutput(requests=scheduled, finished_request_ids=finished))
        used.append(runner.num_lookahead_rows_used - before)
        for i, _ in entries:
            generated[i].append(sampled[i][0].token_id)
    runner.execute(SchedulerOutput(finished_request_ids={"b", "c"}))  # drops c's generator: the next run reseeds it
    return generated, used


def test_lookahead_gives_the_tokens_of_plain_steps():
    hf, hf_config = build_hf("llama")
    config = EngineConfig.from_flat(device="cpu", dtype="float32", num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    runners = {lookahead: ModelRunner(config, hf_config, dict(hf.state_dict()), eos_token_ids=set(), lookahead=lookahead)
               for lookahead in (False, True)}
    plain, plain_used = run_script(runners[False], slots_ahead=0)
    assert sum(plain_used) == 0
    # Rows used per step. No slot ahead: a decode whose next position opens a block is computed afresh the
    # step after (steps 3, 4, 7, 11), the others ran ahead. One slot ahead: every decode but the first of a
    # request (steps 0 and 4: c's prefill; 8: b's recompute) ran ahead.
    expected = {0: [0, 2, 2, 1, 1, 2, 2, 0, 1, 2, 2, 0], 1: [0, 2, 2, 2, 1, 2, 2, 2, 1, 2, 2, 2]}
    for slots_ahead in (0, 1):
        ahead, ahead_used = run_script(runners[True], slots_ahead)
        assert ahead == plain
        assert ahead_used == expected[slots_ahead]
