"""The transition study's LightningModules and the gating options they use (gate bias, ReLU predictor,
label-frequency precision), each against a hand-written reference."""


import pytest
import torch
import torch.nn.functional as F

from lightning_moe.studies.transitions.data import chars_batch, regression_batch, routing_batch
from lightning_moe.gating import TransitionRouter
from lightning_moe.gating.transitions import label_frequency_error
from lightning_moe.studies.transitions.modules import (
    TransitionCharLM,
    TransitionPrecisionRegression,
    TransitionRoutingToy,
    TransitionSequenceRouting,
)

PLAIN = {"beta": False, "precision": False, "anticipation": False, "gate_bias": True, "load_balancing_weight": 0.0,
             "z_loss_weight": 0.0}



def test_label_frequency_error_is_the_share_not_targeting_each_expert():
    targets = torch.tensor([0, 0, 2, 0])
    torch.testing.assert_close(label_frequency_error(targets, 4), torch.tensor([0.25, 1.0, 0.75, 1.0]))


def test_update_precision_is_one_ema_step():
    router = TransitionRouter(**{**PLAIN, "precision": True}, precision_init_var=0.5)
    router.bind(4, 4, 4)
    router.update_precision(torch.tensor([0.0, 1.0, 0.5, 1.0]))
    torch.testing.assert_close(router.precision_var_E, torch.tensor([0.475, 0.525, 0.5, 0.525]))


def test_gate_bias_and_relu_predictor_options_build_the_reference_layers():
    router = TransitionRouter(**{**PLAIN, "anticipation": True}, predictor_activation="relu",
                              anticipation_form="direct")
    router.bind(16, 4, 4)
    assert router.layer.bias is not None and isinstance(router.predictor[1], torch.nn.ReLU)
    with pytest.raises(ValueError, match="predictor_activation"):
        TransitionRouter(predictor_activation="tanh")


def toy(**router_kwargs):
    torch.manual_seed(0)
    return TransitionRoutingToy(TransitionRouter(**{**PLAIN, **router_kwargs}))


def test_toy_loss_is_the_sum_over_routed_steps_of_the_batch_mean_ce():
    model = toy()
    batch = routing_batch(torch.Generator().manual_seed(0), 8, 12, 6, 6)
    logits = model.router.layer(batch["inputs_embeds"][:, :11])
    expected = sum(F.cross_entropy(logits[:, t], batch["labels"][:, t]) for t in range(11))
    torch.testing.assert_close(model.training_step(batch, 0), expected)


def test_oracle_routes_each_step_on_the_next_input():
    model = TransitionRoutingToy(TransitionRouter(**PLAIN), route_on="next")
    x = torch.randn(2, 12, 16)
    logits, _ = model.gate(x)
    torch.testing.assert_close(logits, model.router.layer(x[:, 1:]))


def test_toy_precision_takes_one_label_frequency_step_per_routed_step():
    model = toy(precision=True, precision_init_var=0.5)
    batch = routing_batch(torch.Generator().manual_seed(1), 8, 12, 6, 6)
    model.training_step(batch, 0)
    model.on_before_optimizer_step(None)
    var = torch.full((4,), 0.5)
    for t in range(11):
        var = 0.95 * var + 0.05 * label_frequency_error(batch["labels"][:, t], 4)
    torch.testing.assert_close(model.router.precision_var_E, var)


def test_char_lm_gathers_expert_outputs_exactly_as_per_token_evaluation():
    torch.manual_seed(0)
    model = TransitionCharLM(TransitionRouter(**{**PLAIN, "beta": True}), d_model=8, d_expert=16)
    tokens = chars_batch(torch.Generator().manual_seed(0), 3, 16, 8, 8)["tokens"]
    logits, gates, _ = model(tokens)
    x = model.embedding(tokens)
    mixed = sum(gates[..., e : e + 1] * expert(x) for e, expert in enumerate(model.experts))
    torch.testing.assert_close(logits, model.head(model.norm(x + mixed)), rtol=1e-5, atol=1e-5)


def test_char_lm_mixture_gradients_equal_per_token_evaluation():
    torch.manual_seed(0)
    model = TransitionCharLM(TransitionRouter(**{**PLAIN, "beta": True}), d_model=8, d_expert=16)
    tokens = chars_batch(torch.Generator().manual_seed(0), 3, 16, 8, 8)["tokens"]
    upstream = torch.randn(3, 15, 26)

    def per_token():
        x = model.embedding(tokens)
        gates = model.router(x).scores_TE.view(3, 15, -1)
        mixed = sum(gates[..., e : e + 1] * expert(x) for e, expert in enumerate(model.experts))
        return model.head(model.norm(x + mixed))

    grads = [torch.autograd.grad((fn() * upstream).sum(), list(model.parameters()))
             for fn in (lambda: model(tokens)[0], per_token)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_char_lm_weights_the_transition_step_and_divides_by_the_token_count():
    torch.manual_seed(0)
    model = TransitionCharLM(TransitionRouter(**PLAIN), d_model=8, d_expert=16, transition_weight=5.0)
    batch = chars_batch(torch.Generator().manual_seed(1), 4, 16, 8, 8)
    logits, _, _ = model(batch["tokens"])
    ce = F.cross_entropy(logits.reshape(-1, 26), batch["labels"].reshape(-1), reduction="none").view(4, 15)
    expected = (ce.sum() + 4 * ce[:, 7].sum()) / ce.numel()
    torch.testing.assert_close(model.training_step(batch, 1), expected)


def test_modules_reject_a_router_that_is_not_a_transition_router():
    from lightning_moe.gating import SoftmaxTopK

    with pytest.raises(TypeError, match="router"):
        TransitionRoutingToy(SoftmaxTopK())
    with pytest.raises(ValueError, match="route_on"):
        TransitionRoutingToy(TransitionRouter(**PLAIN), route_on="previous")


def test_capped_logit_membrane_matches_the_reference_loop():
    torch.manual_seed(0)
    router = TransitionRouter(**{**PLAIN, "beta": True}, memory_form="capped_logit", init_beta=0.75)
    router.bind(16, 4, 4)
    x = torch.randn(3, 8, 16)
    u = torch.zeros(3, 4)
    for t in range(8):  # beta_routing.py: U = beta U + W x_t; U = U - relu(U - theta)
        u = 0.75 * u + router.layer(x[:, t])
        u = u - F.relu(u - 1.0)
    torch.testing.assert_close(router(x).logits_TE.view(3, 8, 4)[:, -1], u)
    assert router.logit_beta.shape == (4,)


def test_fixed_beta_is_not_learned_and_capped_memory_rejects_anticipation():
    router = TransitionRouter(**{**PLAIN, "beta": True}, memory_form="capped_logit", learn_beta=False)
    router.bind(16, 4, 4)
    assert not router.logit_beta.requires_grad
    with pytest.raises(ValueError, match="capped_logit"):
        TransitionRouter(beta=True, anticipation=True, memory_form="capped_logit")


def test_sequence_routing_reads_the_last_step_or_the_mean_and_can_use_the_double_softmax():
    torch.manual_seed(0)
    last = TransitionSequenceRouting(TransitionRouter(**PLAIN))
    mean = TransitionSequenceRouting(TransitionRouter(**PLAIN), readout="mean", loss_on_probabilities=True)
    batch = routing_batch(torch.Generator().manual_seed(0), 8, 8, 4, 4)
    x, target = batch["inputs_embeds"], batch["labels"][:, -1]
    torch.testing.assert_close(last(x), last.router.layer(x[:, -1]))
    probs = mean.router.layer(x.mean(1)).softmax(-1)
    torch.testing.assert_close(mean.training_step(batch, 0), F.cross_entropy(probs, target))


def test_precision_regression_feeds_pi_the_noisy_expert_errors_and_swaps_reliability():
    torch.manual_seed(0)
    model = TransitionPrecisionRegression(TransitionRouter(**{**PLAIN, "precision": True}),
                                          shifted_noise=(1.5, 0.5, 0.1, 0.5), shift_step=3)
    torch.testing.assert_close(model.noise_E(2), torch.tensor([0.1, 0.5, 1.5, 0.5]))
    torch.testing.assert_close(model.noise_E(3), torch.tensor([1.5, 0.5, 0.1, 0.5]))
    batch = regression_batch(torch.Generator().manual_seed(0), 64)
    torch.manual_seed(1)
    out_B1, outs_BE1 = model(batch["inputs_embeds"], model.noise_E(0))
    errors = ((outs_BE1 - batch["labels"][:, None]) ** 2).mean(dim=(0, 2)).detach()
    torch.manual_seed(1)  # the same output noise again
    model.training_step(batch, 0)
    model.on_before_optimizer_step(None)
    torch.testing.assert_close(model.router.precision_var_E, 0.95 + 0.05 * errors)
    # The noisiest expert (std 1.5 -> variance 2.25) has by far the largest error.
    assert errors.argmax().item() == 2 and errors[2] > 1.5


def test_regression_target_is_the_mean_of_the_domains_half():
    b = regression_batch(torch.Generator().manual_seed(4), 32)
    for i in range(32):
        d = b["domain_ids"][i, 0].item()
        x = b["inputs_embeds"][i, 0]
        assert b["labels"][i, 0].item() == pytest.approx(x[8 * d : 8 * d + 8].mean().item(), abs=1e-6)


@pytest.mark.parametrize("module_cls, task", [
    (TransitionRoutingToy, "routing"), (TransitionSequenceRouting, "early_signal"),
    (TransitionCharLM, "chars"), (TransitionPrecisionRegression, "regression"),
])
def test_checkpoint_rebuilds_the_module_and_its_router_from_the_path_alone(module_cls, task, tmp_path):
    import lightning.pytorch as pl

    from lightning_moe.studies.transitions import TransitionTaskDataModule

    torch.manual_seed(0)
    module = module_cls(TransitionRouter(**{**PLAIN, "beta": True}))
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TransitionTaskDataModule(task=task, batch_size=4, val_batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = module_cls.load_from_checkpoint(tmp_path / "m.ckpt")
    assert restored.router.config() == module.router.config()
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    for name, value in state.items():
        torch.testing.assert_close(restored_state[name], value, rtol=0, atol=0)


def test_transition_monitor_on_the_toy_measures_the_transition_step_and_writes_the_curves(tmp_path):
    # The study's path: the core TransitionMonitor watches the toy's router through the batch's domain_ids. Its
    # held-out p_correct@-1 is the gate's probability on the target expert at each sequence's transition step,
    # computed here directly from the trained module on the same held-out batches.
    import json

    import lightning.pytorch as pl

    from lightning_moe.callbacks import TransitionMonitor
    from lightning_moe.studies.transitions import TransitionTaskDataModule

    torch.manual_seed(0)
    model = toy()
    data = TransitionTaskDataModule(batch_size=32, val_batch_size=64, val_batches=2, switch_low=4, switch_high=7)
    monitor = TransitionMonitor(num_labels=2, window=8, correct_experts=[0, 2], spans={"after": [0, 3]},
                                artifact="curve.json", plots=False)
    pl.Trainer(max_steps=4, val_check_interval=4, log_every_n_steps=2, callbacks=[monitor], logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, default_root_dir=tmp_path).fit(model, datamodule=data)
    p, n = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits_BSE, _ = model.gate(batch["inputs_embeds"])
            probs_BSE = logits_BSE.softmax(-1)
            trans_BS = batch["transition_mask"][:, :-1]
            p.append(probs_BSE.gather(-1, batch["labels"][:, :-1, None]).squeeze(-1)[trans_BS])
            after_BS = torch.zeros_like(trans_BS)  # offsets 0..3: the four steps after the transition step
            for shift in range(1, 5):
                after_BS[:, shift:] |= trans_BS[:, :-shift]
            n.append(probs_BSE.gather(-1, batch["labels"][:, :-1, None]).squeeze(-1)[after_BS])
    logged = monitor.logged
    assert logged["val/transition/router/p_correct@-1"] == pytest.approx(torch.cat(p).mean().item(), rel=1e-5)
    # Offsets 0..3 fall inside the 11 routed steps for switches 4..7, so the span pools exactly those tokens.
    assert logged["val/transition/router/p_correct@after"] == pytest.approx(torch.cat(n).mean().item(), rel=1e-5)
    assert "train/transition/router/acc_correct@-1" in logged
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["step"] == 4 and curve["val"]["router"]["offsets"] == list(range(-8, 9))
    assert curve["val"]["router"]["p_correct"][0] is None  # offset -8: no switch that early, strict-JSON null


def test_the_module_writes_its_per_step_loss_and_pi_through_its_run_artifact(tmp_path):
    import json

    import lightning.pytorch as pl

    from lightning_moe.studies.transitions import TransitionTaskDataModule

    torch.manual_seed(0)
    model = TransitionPrecisionRegression(TransitionRouter(**{**PLAIN, "precision": True}))
    data = TransitionTaskDataModule(task="regression", batch_size=16, val_batch_size=16, val_batches=1)
    pl.Trainer(max_steps=3, val_check_interval=3, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, default_root_dir=tmp_path).fit(model, datamodule=data)
    written = json.loads((tmp_path / "precision_trajectory.json").read_text())
    assert written == model.artifact()
    assert len(written["loss"]) == 3 and len(written["precision"]) == 3 and len(written["precision"][0]) == 4
