"""Direct tests for three bugs that a mutation audit found the rest of the suite blind to: each
is present at every layout, so comparing layouts with the single-process trainer cannot see it.

1. the global-scope LBL counts not cleared between optimizer steps;
2. the aux-loss-free expert bias leaking into the combine weights (weights gathered from
   scores + bias instead of the scores; renormalised they still sum to one);
3. each micro-batch's aux losses scaled by 1 instead of 1 / micro-batches.

Each lockstep test also runs the comparison against the reference with the bug built in and
asserts it fails, from the step where the bug first acts: the setting is one that shows the bug.
"""

import torch

from moetrain.config.schema import RoutingConfig
from moetrain.model.moe.router import Router
from tests.oracle.lockstep import first_step_grads, rel_l2, run_lockstep
from tests.oracle.reference import Reference


class CountsCarriedOver(Reference):
    """Bug 1: the global scope's running counts continue from the previous step."""

    def step_counts(self):
        if not hasattr(self, "_carried"):
            self._carried = super().step_counts()
        return self._carried


class BiasedCombineWeights(Reference):
    """Bug 2: combine weights from scores + bias."""

    biased_weights = True


class AuxScaleOne(Reference):
    """Bug 3: every micro-batch's aux losses with weight 1."""

    def aux_scale(self, micro_batches: int) -> float:
        return 1.0


def assert_bug_seen_from(step: int, buggy) -> None:
    assert buggy.first_failing_step() == step, buggy.failures[:3]
    assert any(" grad " in f for f in buggy.failures), buggy.failures[:3]


def test_global_scope_counts_start_from_zero_every_step(tmp_path):
    overrides = ["model.moe.lbl.scope=global"]  # two micro-batches per step
    run_lockstep(tmp_path / "run", overrides).assert_equal()
    # Step 1 starts from zero either way; from step 2 carried counts change the LBL's f.
    assert_bug_seen_from(2, run_lockstep(tmp_path / "carried", overrides,
                                         reference=CountsCarriedOver))


def test_expert_bias_selects_but_the_combine_weights_stay_unbiased(tmp_path):
    for norm in ("true", "false"):
        overrides = ["model.moe.routing.bias_rate=0.01", f"model.moe.norm_topk_prob={norm}"]
        result = run_lockstep(tmp_path / f"run-{norm}", overrides)
        result.assert_equal()
        assert all(b.abs().sum() > 0 for b in result.reference.bias.values())
        # The bias is zero in step 1 and moves after it: the leak acts from step 2.
        assert_bug_seen_from(2, run_lockstep(tmp_path / f"biased-{norm}", overrides,
                                             reference=BiasedCombineWeights))


def test_router_weights_are_the_unbiased_scores_of_the_biased_selection():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    for norm in (True, False):
        router = Router(16, 8, 2, "softmax", norm, RoutingConfig(bias_rate=0.01))
        torch.nn.init.normal_(router.weight, std=0.5)
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(0.3, -0.3, 8))
        out = router(x)
        scores = torch.softmax(x @ router.weight.detach().T, dim=-1)
        # The bias changed the selection of most tokens...
        unbiased = scores.topk(2, dim=-1).indices
        assert (out.topk_idx_TK != unbiased).any(-1).float().mean() > 0.3
        # ...but the weights are the unbiased scores of the selected experts (renormalised).
        want = scores.gather(1, out.topk_idx_TK)
        if norm:
            want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(out.topk_weight_TK.detach(), want, rtol=1e-6, atol=1e-7)


def test_aux_losses_count_one_over_micro_batches(tmp_path):
    overrides = ["train.micro_batch_size=1"]  # four micro-batches per step
    run_lockstep(tmp_path / "run", overrides).assert_equal()
    assert_bug_seen_from(1, run_lockstep(tmp_path / "scale-one", overrides, reference=AuxScaleOne))


def test_z_loss_gradient_does_not_depend_on_the_micro_batching(tmp_path):
    """Without the LBL (whose f depends on the micro-batch), the aux loss is a per-token mean:
    one micro-batch of 4 and four of 1 give the same gradient - only with the scale 1 / 4."""
    overrides = ["model.moe.lbl.coeff=0", "model.moe.z_loss_coeff=0.1", "optim.grad_clip=0"]
    one = first_step_grads(tmp_path / "one", [*overrides, "train.micro_batch_size=4"])
    four = first_step_grads(tmp_path / "four", [*overrides, "train.micro_batch_size=1"])
    assert sorted(one) == sorted(four)
    errors = {name: rel_l2(four[name], one[name]) for name in one}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
