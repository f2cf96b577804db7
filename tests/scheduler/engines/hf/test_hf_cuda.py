"""The transformers adapter on CUDA: restores into the model's device give the tokens of recomputing.

A tiny random Llama on the GPU (float32 eager attention, and bfloat16), its prefix saved into kvtier's
host and disk tiers and restored from them (the host pool pinned, copies on kvtier's own stream, the
per-layer waits on CUDA-synchronised events). On a GPU the suffix-only pass and the whole-prompt pass
run kernels of other shapes, so logits are compared within a tolerance and greedy tokens exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from kvtier.scheduler.config import OffloadConfig  # noqa: E402
from kvtier.scheduler.engines.hf.adapter import HFEngine  # noqa: E402
from kvtier.scheduler.engines.hf.generate import greedy_generate, prefill  # noqa: E402
from kvtier.scheduler.engines.hf.kv import spec_for_model  # noqa: E402
from kvtier.scheduler.engines.models import build_random_llama  # noqa: E402
from kvtier.scheduler.manager import OffloadManager  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.transformers]

T = 16
#: float32 logits of a restored prefix vs recomputing, on CUDA (other kernel shapes, same math)
FP32_LOGIT_ATOL = 1e-4
#: bfloat16 logits (magnitude ~0.5) may differ by at most this
BF16_LOGIT_ATOL = 0.05


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def full_restore(blocks: int):
    return lambda plan: dataclasses.replace(plan, split=0, restore_stop=blocks)


@pytest.fixture(scope="module")
def prompts():
    first = tokens(6 * T + 5, seed=1)
    return first, torch.cat([first, tokens(2 * T + 3, seed=9)])  # the second shares 6 full blocks


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_restore_on_cuda_gives_the_greedy_tokens_of_recomputing(prompts, tier, tmp_path):
    model = build_random_llama(seed=0).cuda()
    spec = spec_for_model(model, "random-0", T)
    first, second = prompts
    want_logits, _ = prefill(model, second)
    want_tokens = greedy_generate(model, second, None, 6)
    sizes = dict(host_bytes=64 * spec.bytes_per_block)
    if tier == "disk":
        sizes.update(disk_bytes=64 * spec.bytes_per_block, disk_path=str(tmp_path / "kv"))
        with OffloadManager(spec, OffloadConfig(prefetch=False, **sizes), model_config=model.config.to_dict()) as m:
            HFEngine(model, m).prefill(first)
            m.flush()
    with OffloadManager(spec, OffloadConfig(prefetch=False, **sizes), model_config=model.config.to_dict()) as manager:
        engine = HFEngine(model, manager)
        if tier == "host":
            engine.prefill(first)
            manager.flush()
        out = engine.generate(second, 6, plan_fn=full_restore(6))
        assert out.prefill.restored_tokens == 6 * T and out.prefill.failed_blocks == 0
        assert manager.stats()["hit_blocks_by_tier"] == {tier: 6}
        assert out.prefill.logits.device.type == "cuda"
        torch.testing.assert_close(out.prefill.logits, want_logits, atol=FP32_LOGIT_ATOL, rtol=0)
        assert torch.equal(out.tokens.cpu(), want_tokens.cpu())


def test_bfloat16_restore_on_cuda_is_within_tolerance(prompts):
    model = build_random_llama(seed=0, dtype=torch.bfloat16).cuda()
    spec = spec_for_model(model, "random-0", T)
    first, second = prompts
    with OffloadManager(spec, OffloadConfig(prefetch=False, host_bytes=64 * spec.bytes_per_block),
                        model_config=model.config.to_dict()) as manager:
        engine = HFEngine(model, manager)
        engine.prefill(first)
        manager.flush()
        # a split plan: the front recomputed on the default stream while the back loads on kvtier's stream
        result = engine.prefill(second, plan_fn=lambda plan: dataclasses.replace(plan, split=2, restore_stop=6))
        assert result.restored_tokens == 4 * T
        want, _ = prefill(model, second)
        torch.testing.assert_close(result.logits.float(), want.float(), atol=BF16_LOGIT_ATOL, rtol=0)
