"""Task routing (arXiv 2606.14398): the template/key-value generator, its batches, the task-routing loss, greedy
exact match, the routing numbers and the oracle router."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.studies.task_routing.data import (
    EOS,
    IGNORE_INDEX,
    OBJECT,
    PAD,
    SUBJECT,
    SentenceDataset,
    TaskRoutingDataModule,
    TemplateKVTasks,
)
from lightning_moe.gating import SoftmaxTopK
from lightning_moe.studies.task_routing.oracle import OracleRouter
from lightning_moe.studies.task_routing.module import (
    TaskRoutingLM,
    greedy_exact_match,
    routing_scalars,
    task_experts,
    task_routing_loss,
)

SMALL = {"num_tasks": 3, "pairs_per_task": 10, "num_subjects": 50, "min_objects": 4, "max_objects": 6, "function_words": 8}


def tiny_lm(**kw):
    args = {"num_tasks": 3, "vocab_size": TemplateKVTasks(**SMALL).vocab_size, "d_model": 16, "n_layers": 1, "n_heads": 2,
                "d_ff": 8, "num_experts": 3, "top_k": 1, "activation": "gelu", "max_seq_len": 16, "warmup_steps": 1}
    return TaskRoutingLM(**{**args, **kw})


# --- generator -------------------------------------------------------------------------------------------------


def test_same_seed_same_data_and_vocabulary_layout():
    a, b = TemplateKVTasks(**SMALL), TemplateKVTasks(**SMALL)
    assert a.tasks == b.tasks and a.train == b.train and a.test == b.test
    pools = sum(len({o for _, o in t.facts}) <= 6 for t in a.tasks)  # objects come from pools of 4-6
    assert pools == 3
    # PAD, EOS, 8 function words, 2 relation words x 3 tasks, 50 subjects, then the object pools.
    first_object = 2 + 8 + 2 * 3 + 50
    assert min(o for t in a.tasks for _, o in t.facts) >= first_object
    assert a.vocab_size <= first_object + 3 * 6


def test_templates_have_one_subject_slot_before_one_object_slot_and_a_relation_word():
    t = TemplateKVTasks(**SMALL)
    relation = {k: set(range(10 + 2 * k, 12 + 2 * k)) for k in range(3)}  # rel0 = 2 + 8 function words
    for k, task in enumerate(t.tasks):
        for tpl in task.templates:
            assert 4 <= len(tpl) <= 8
            assert tpl.count(SUBJECT) == 1 and tpl.count(OBJECT) == 1
            assert tpl.index(SUBJECT) < tpl.index(OBJECT)
            assert relation[k] & set(tpl)  # overlap 0: every template carries a task-unique word


def test_full_overlap_removes_every_task_unique_word():
    t = TemplateKVTasks(**SMALL, overlap=1.0)
    words = {w for task in t.tasks for tpl in task.templates for w in tpl}
    assert not words & set(range(10, 16))


def test_task_k_is_the_same_task_whatever_the_number_of_tasks():
    small, large = TemplateKVTasks(**SMALL), TemplateKVTasks(**{**SMALL, "num_tasks": 5})
    shift = 2 * 2  # two more tasks' relation words push the subject and object ids up by 4
    for a, b in zip(small.tasks, large.tasks[:3]):
        assert a.templates == b.templates
        assert [(s + shift, o + shift) for s, o in a.facts] == list(b.facts)


def test_split_keeps_a_fifth_of_each_task_and_no_sentence_twice():
    t = TemplateKVTasks(**SMALL)
    for k in range(3):
        assert sum(s.task == k for s in t.test) == 10 and sum(s.task == k for s in t.train) == 40  # 5 x 10 each
    assert not set(t.train) & set(t.test)


def test_each_subject_has_one_object_per_task():
    for task in TemplateKVTasks(**SMALL).tasks:
        subjects = [s for s, _ in task.facts]
        assert len(subjects) == len(set(subjects)) == 10


def test_complexity_and_bound_follow_the_paper():
    task = TemplateKVTasks(**SMALL).tasks[0]
    lengths = [len(t) for t in task.templates]
    assert task.complexity == sum(lengths) + 10
    assert task.width_bound == max(lengths) * 5 + 10


@pytest.mark.parametrize("kw, field", [
    ({"pairs_per_task": 60}, "pairs_per_task"), ({"overlap": 1.5}, "overlap"),
    ({"min_template_len": 2}, "min_template_len"), ({"test_fraction": 1.0}, "test_fraction"),
    ({"max_objects": 3}, "max_objects"),
])
def test_bad_generator_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TemplateKVTasks(**{**SMALL, **kw})


# --- batches ---------------------------------------------------------------------------------------------------


def test_batch_masks_mark_the_answer_after_the_prefix_before_the_object():
    t = TemplateKVTasks(**SMALL)
    s = t.train[0]
    item = SentenceDataset([s], t.max_len, t.seen_facts)[0]
    n = len(s.tokens)
    assert item["tokens"][:n].tolist() == list(s.tokens) and item["tokens"][n:].eq(PAD).all()
    assert item["labels"][: n - 1].tolist() == list(s.tokens[1:]) and item["labels"][n - 1:].eq(IGNORE_INDEX).all()
    assert s.tokens[-1] == EOS
    # The answer is the object, the rest of the template and EOS: labels of positions object_pos-1 .. n-2.
    assert item["target_mask"].nonzero().flatten().tolist() == list(range(s.object_pos - 1, n - 1))
    assert item["labels"][item["object_pos"]] == s.object
    assert item["task_ids"][:n].eq(s.task).all() and item["task_ids"][n:].eq(-1).all()
    assert item["after_subject"].nonzero().flatten().tolist() == list(range(s.subject_pos + 1, n))
    assert item["answerable"]  # a training sentence's fact is seen by definition


def test_datamodule_serves_test_and_train_for_validation():
    dm = TaskRoutingDataModule(TemplateKVTasks(**SMALL), batch_size=8, eval_batch_size=64)
    dm.setup()
    test, train = dm.val_dataloader()
    assert len(test.dataset) == 30 and len(train.dataset) == 120
    assert len(dm.train_dataloader()) == 120 // 8


# --- losses and evaluation -------------------------------------------------------------------------------------


def test_task_experts_is_k_mod_e_and_keeps_padding():
    assert task_experts(torch.tensor([0, 1, 6, 7, 13, -1]), 7).tolist() == [0, 1, 6, 0, 6, -1]


def test_task_routing_loss_is_the_mean_negative_log_probability_of_the_task_expert():
    logits_TE = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [5.0, 5.0, 5.0]])
    task_ids_T = torch.tensor([0, 4, 1, -1])  # experts 0, 1, 1; the last position has no task
    logp = F.log_softmax(logits_TE, -1)
    expected = -(logp[0, 0] + logp[1, 1] + logp[2, 1]) / 3
    assert task_routing_loss(logits_TE, task_ids_T).item() == pytest.approx(expected.item(), abs=1e-6)
    assert task_routing_loss(torch.zeros(2, 4), torch.tensor([0, 3])).item() == pytest.approx(math.log(4))


def test_greedy_exact_match_matches_a_token_by_token_greedy_decoder():
    # A causal "model" whose next token depends only on the current token: table[token]. Greedy decoding from the
    # prefix is then an explicit loop, the reference for the one-pass teacher-forced check.
    V = 6
    table = torch.tensor([1, 2, 3, 4, 5, 0])
    tokens = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 5, 4], [3, 4, 0, 1, 2]])
    labels = torch.cat([tokens[:, 1:], torch.full((3, 1), IGNORE_INDEX)], 1)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 1:4] = True  # the answer: labels of positions 1..3 (tokens 2..4)
    logits = F.one_hot(table[tokens], V).float()
    reference = []
    for b in range(3):
        tok, ok = int(tokens[b, 1]), True
        for p in range(1, 4):
            tok = int(table[tok])
            ok &= tok == int(tokens[b, p + 1])
        reference.append(ok)
    assert reference == [True, False, False]
    assert greedy_exact_match(logits, labels, mask).tolist() == reference


def test_routing_scalars_on_a_known_table():
    top1_KE = torch.tensor([[9.0, 1.0, 0.0], [0.0, 10.0, 0.0], [4.0, 0.0, 6.0]], dtype=torch.float64)
    s = routing_scalars(top1_KE, top1_KE, dominant_share=0.8)
    assert s["task_purity"].item() == pytest.approx((0.9 + 1.0 + 0.6) / 3)
    assert s["dominant_tasks"].item() == 2 and s["dominant_frac"].item() == pytest.approx(2 / 3)
    assert s["expert_purity"].item() == pytest.approx((9 + 10 + 6) / 30)
    assert s["injective"].item() == 1.0


def test_two_tasks_on_one_top_expert_are_not_injective_and_k_above_e_has_no_injectivity():
    shared_KE = torch.tensor([[9.0, 1.0], [8.0, 2.0]], dtype=torch.float64)
    assert routing_scalars(shared_KE, shared_KE, 0.8)["injective"].item() == 0.0
    many_KE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert "injective" not in routing_scalars(many_KE, many_KE, 0.8)


# --- oracle router and the module ------------------------------------------------------------------------------


def test_oracle_routes_each_token_to_its_assigned_expert_with_weight_one():
    router = OracleRouter()
    router.bind(4, 3, 1)
    router.assign(torch.tensor([[0, 2], [1, 1]]))
    r = router(torch.randn(2, 2, 4))
    assert r.experts_TK.flatten().tolist() == [0, 2, 1, 1]
    assert r.weights_TK.eq(1).all() and r.scores_TE.tolist()[1] == [0.0, 0.0, 1.0] and not r.aux_losses


def test_oracle_refuses_a_forward_without_a_matching_assignment():
    router = OracleRouter()
    router.bind(4, 3, 1)
    with pytest.raises(ValueError, match="assign"):
        router(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        router.assign(torch.tensor([[0, 3]]))


def test_oracle_needs_top_1():
    with pytest.raises(ValueError, match="top_k: 1"):
        OracleRouter().bind(4, 3, 2)


def test_module_with_an_oracle_sends_every_task_position_to_its_expert():
    dm = TaskRoutingDataModule(TemplateKVTasks(**SMALL), batch_size=8)
    dm.setup()
    lm = tiny_lm(router=OracleRouter())
    batch = next(iter(dm.train_dataloader()))
    lm._ce(batch)
    experts_T = lm.layer.routing.experts_TK[:, 0]
    task_T = batch["task_ids"].flatten()
    assert experts_T[task_T >= 0].tolist() == task_T[task_T >= 0].tolist()  # K = E = 3: e(k) = k


def test_oracle_with_a_task_routing_weight_is_refused():
    with pytest.raises(ValueError, match="task_routing_weight"):
        tiny_lm(router=OracleRouter(), task_routing_weight=0.1)


def test_module_needs_exactly_one_moe_layer():
    with pytest.raises(ValueError, match="n_layers: 1"):
        tiny_lm(n_layers=2)


def test_the_task_routing_loss_teaches_the_router_the_task_map():
    # 40 steps of CE + 1.0 x L_router on 3 tasks, 3 experts: the router's top-1 follows e(k) = k on nearly every
    # task position of held-out sentences (measured 0.98); with CE alone it does not (measured 0.56).
    dm = TaskRoutingDataModule(TemplateKVTasks(**SMALL), batch_size=16)
    dm.setup()
    test = next(iter(dm.val_dataloader()[0]))

    def agreement(weight):
        torch.manual_seed(0)
        lm = tiny_lm(task_routing_weight=weight, router=SoftmaxTopK(load_balancing_weight=0.0, z_loss_weight=0.0))
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        loader = iter(dm.train_dataloader())
        for _ in range(40):
            batch = next(loader, None) or next(loader := iter(dm.train_dataloader()))
            loss = lm._ce(batch)
            loss = loss + weight * task_routing_loss(lm.layer.routing.logits_TE, batch["task_ids"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            lm._ce(test)
        task_T = test["task_ids"].flatten()
        return (lm.layer.routing.experts_TK[:, 0] == task_T)[task_T >= 0].float().mean().item()

    assert agreement(1.0) > 0.9
    assert agreement(0.0) < 0.7


def test_the_data_module_takes_the_generator_and_saves_it_as_plain_data():
    dm = TaskRoutingDataModule(TemplateKVTasks(**SMALL), batch_size=8)
    assert dm.hparams["tasks"] == {"class_path": "lightning_moe.studies.task_routing.data.TemplateKVTasks",
                                   "init_args": {**TemplateKVTasks(**SMALL).init_args}}
    rebuilt = TaskRoutingDataModule(**dm.hparams)  # what a checkpoint's datamodule hyper-parameters rebuild
    assert rebuilt.vocab_size == dm.vocab_size and rebuilt.tasks.train == dm.tasks.train


def test_run_artifact_rejects_a_module_without_artifact(tmp_path):
    import lightning.pytorch as pl

    from lightning_moe.studies.artifacts import RunArtifact

    class Plain(pl.LightningModule):
        pass

    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(TypeError, match="artifact"):
        RunArtifact("routing.json").on_fit_end(trainer, Plain())


def test_exact_match_ceiling_on_a_hand_made_ambiguity():
    from lightning_moe.studies.task_routing.data import OBJECT, SUBJECT, Sentence, Task

    # Two tasks share the template "w S O" (word 9, subject, object); subject 5 is in both dictionaries with
    # different objects, subject 6 only in task 0. Task 1's second template "w S v O" names it.
    g = TemplateKVTasks(num_tasks=2, pairs_per_task=2, num_subjects=4, seed=0)
    shared, own = (9, SUBJECT, OBJECT), (9, SUBJECT, 8, OBJECT)
    g.tasks = [Task((shared,), ((5, 20), (6, 21))), Task((shared, own), ((5, 30),))]

    def sentence(k, i, subject, obj):
        template = g.tasks[k].templates[i]
        return Sentence(k, i, subject, obj, (), template.index(SUBJECT), template.index(OBJECT))

    g.train = [sentence(0, 0, 5, 20), sentence(0, 0, 6, 21), sentence(1, 0, 5, 30), sentence(1, 1, 5, 30)]
    g.test = [sentence(1, 1, 5, 30)]
    # train: (5 under "w S O"): two options, 1/2 each; (6): determined; task 1's own template: determined.
    assert g.exact_match_ceiling("train") == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    assert g.exact_match_ceiling("test") == 1.0
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        g.exact_match_ceiling("dev")
