"""Synthetic knowledge tasks made of syntactic templates and key-value dictionaries (arXiv 2606.14398, §6).

A *task* k is a set of templates T(k) and a finite dictionary Δ_k (subject -> object). A template is a word
sequence with two slots, the subject slot before the object slot; a sentence is a template with a dictionary
entry filled in, then EOS. Subjects come from one pool shared by every task (a subject alone does not reveal the
task), objects from a per-task pool (the relation's "type", like cities vs languages). Each task also owns a few
relation words; the ``overlap`` knob replaces them by shared function words, so that at ``overlap`` near 1 the
task is identified by word order only. Entities are single tokens, as the paper's entity-preserving tokenizer
makes them. Everything is deterministic from ``seed``; nothing is downloaded.

Legend: B batch (sentences), S sequence positions, K tasks (``task_ids`` are in [0, K), -1 where no task).

A batch is ``{"tokens", "labels", "task_ids", "target_mask", "object_pos", "after_subject", "answerable"}``:
``labels`` are the next tokens (-100 after EOS); ``target_mask`` marks the positions whose label is part of the
answer (the object, the rest of the template and EOS) — the greedy continuation of the prefix before the object;
``object_pos`` is the position whose label is the object; ``after_subject`` marks the positions after the subject
slot; ``answerable`` says whether the sentence's fact (task, subject) appears in at least one training sentence.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_moe.data import IGNORE_INDEX
from lightning_moe.utils import check_non_negative, check_positive_int

PAD, EOS = 0, 1
SUBJECT, OBJECT = -1, -2  # slot markers inside a template


@dataclass(frozen=True)
class Task:
    """One knowledge task: its templates (word ids, with ``SUBJECT``/``OBJECT`` slots) and its dictionary."""

    templates: tuple[tuple[int, ...], ...]
    facts: tuple[tuple[int, int], ...]  # (subject, object) pairs; each subject at most once

    @property
    def complexity(self) -> int:
        """c(k) = Σ_τ |τ| + |Δ_k| (the paper's task complexity; |τ| counts both slots)."""
        return sum(map(len, self.templates)) + len(self.facts)

    @property
    def width_bound(self) -> int:
        """L·|T(k)| + N: Thm 4.2's bound on the FFN neurons expert k needs (L = the longest template)."""
        return max(map(len, self.templates)) * len(self.templates) + len(self.facts)


@dataclass(frozen=True)
class Sentence:
    task: int
    template: int
    subject: int
    object: int
    tokens: tuple[int, ...]  # ends with EOS
    subject_pos: int
    object_pos: int  # index of the object token in ``tokens``


class TemplateKVTasks:
    """The generator: K tasks over one vocabulary, their sentences and a random train/test split.

    Vocabulary layout: ``PAD``, ``EOS``, the shared function words, each task's relation words, the shared
    subject pool, then each task's object pool.

    Args:
        num_tasks: K.
        templates_per_task: |T(k)|.
        pairs_per_task: |Δ_k| (N), distinct subjects per task drawn from the shared pool.
        min_template_len: shortest template, slots included (at least 3: two slots and one word).
        max_template_len: longest template, slots included.
        num_subjects: size of the shared subject pool (>= ``pairs_per_task``).
        min_objects: smallest per-task object pool; each task's size is drawn from [min, max].
        max_objects: largest per-task object pool.
        function_words: shared function words W.
        relation_words: task-unique relation words r per task.
        overlap: probability ρ that a relation word in a template is replaced by a shared function word.
        test_fraction: share of each task's sentences held out, at random (the paper's 80/20 split).
        seed: seed of everything above.
    """

    def __init__(
        self,
        num_tasks: int = 20,
        templates_per_task: int = 5,
        pairs_per_task: int = 200,
        min_template_len: int = 4,
        max_template_len: int = 8,
        num_subjects: int = 2000,
        min_objects: int = 20,
        max_objects: int = 100,
        function_words: int = 40,
        relation_words: int = 2,
        overlap: float = 0.0,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        # Kept as given, so a DataModule holding this generator saves it as plain data (config()).
        self.init_args = {k: v for k, v in locals().items() if k != "self"}
        for name, value in (("num_tasks", num_tasks), ("templates_per_task", templates_per_task),
                            ("pairs_per_task", pairs_per_task), ("num_subjects", num_subjects),
                            ("min_objects", min_objects), ("function_words", function_words),
                            ("relation_words", relation_words)):
            check_positive_int(name, value)
        if min_template_len < 3 or max_template_len < min_template_len:
            raise ValueError(
                f"template lengths must satisfy 3 <= min_template_len <= max_template_len, got "
                f"min_template_len={min_template_len}, max_template_len={max_template_len}; a template needs two "
                "slots and at least one word."
            )
        if pairs_per_task > num_subjects:
            raise ValueError(
                f"pairs_per_task={pairs_per_task} exceeds num_subjects={num_subjects}: each task needs that many "
                "distinct subjects from the shared pool; raise num_subjects."
            )
        if max_objects < min_objects:
            raise ValueError(f"max_objects={max_objects} must be >= min_objects={min_objects}.")
        if not 0 <= overlap <= 1:
            raise ValueError(f"overlap must lie in [0, 1], got {overlap!r}.")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
        check_non_negative("seed", seed)
        self.num_tasks = num_tasks
        func0 = 2
        rel0 = func0 + function_words
        subj0 = rel0 + relation_words * num_tasks
        obj0 = subj0 + num_subjects
        function_ids = list(range(func0, rel0))
        subjects = list(range(subj0, obj0))
        # One random stream per task, so task k is the same task (up to a shift of the token ids) whatever K is:
        # the capacity sweep compares a task among 5 and among 10 tasks.
        rngs = [random.Random(seed * 1_000_003 + k) for k in range(num_tasks)]
        tasks, next_obj = [], obj0
        for k, rng in enumerate(rngs):
            relation_ids = list(range(rel0 + k * relation_words, rel0 + (k + 1) * relation_words))
            pool = list(range(next_obj, next_obj + rng.randint(min_objects, max_objects)))
            next_obj += len(pool)
            templates: list[tuple[int, ...]] = []
            for _ in range(100 * templates_per_task):  # distinct templates; bounded retries
                if len(templates) == templates_per_task:
                    break
                t = self._template(rng, min_template_len, max_template_len, relation_ids, function_ids, overlap)
                if t not in templates:
                    templates.append(t)
            if len(templates) < templates_per_task:
                raise ValueError(
                    f"could not draw {templates_per_task} distinct templates for task {k}; raise max_template_len or "
                    "function_words, or lower templates_per_task."
                )
            facts = tuple((s, rng.choice(pool)) for s in rng.sample(subjects, pairs_per_task))
            tasks.append(Task(tuple(templates), facts))
        self.tasks: tuple[Task, ...] = tuple(tasks)
        self.vocab_size = next_obj
        self.max_len = max_template_len + 1  # + EOS
        # The split is random over each task's sentences (so every task keeps test_fraction of its sentences).
        self.train: list[Sentence] = []
        self.test: list[Sentence] = []
        for k, (task, rng) in enumerate(zip(tasks, rngs)):
            sentences = [self._fill(k, i, s, o) for i in range(len(task.templates)) for s, o in task.facts]
            order = list(range(len(sentences)))
            rng.shuffle(order)
            n_test = round(test_fraction * len(sentences))
            self.test += [sentences[i] for i in sorted(order[:n_test])]
            self.train += [sentences[i] for i in sorted(order[n_test:])]
        self.seen_facts = {(s.task, s.subject) for s in self.train}

    @staticmethod
    def _template(rng: random.Random, lo: int, hi: int, relation_ids: list[int], function_ids: list[int],
                  overlap: float) -> tuple[int, ...]:
        length = rng.randint(lo, hi)
        n_words = length - 2
        # At least one relation word, so at overlap 0 every template carries a task-unique word.
        n_rel = rng.randint(1, min(len(relation_ids), n_words))
        words = rng.sample(relation_ids, n_rel) + [rng.choice(function_ids) for _ in range(n_words - n_rel)]
        words = [rng.choice(function_ids) if w in relation_ids and rng.random() < overlap else w for w in words]
        rng.shuffle(words)
        i, j = sorted(rng.sample(range(length), 2))  # subject slot before object slot
        for pos, slot in ((i, SUBJECT), (j, OBJECT)):
            words.insert(pos, slot)
        return tuple(words)

    def _fill(self, k: int, i: int, subject: int, obj: int) -> Sentence:
        template = self.tasks[k].templates[i]
        tokens = tuple(subject if w == SUBJECT else obj if w == OBJECT else w for w in template) + (EOS,)
        return Sentence(k, i, subject, obj, tokens, template.index(SUBJECT), template.index(OBJECT))


    def exact_match_ceiling(self, split: str = "test") -> float:
        """The exact match of the best possible model on ``split`` ("train" or "test"): where the prefix before
        the object (the template's words up to the object slot, and the subject) fits several (task, template)
        pairs whose dictionaries hold that subject, the best guess is the most common continuation among them,
        right with probability its share; elsewhere the continuation is determined."""
        sentences = {"train": self.train, "test": self.test}.get(split)
        if sentences is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        objects = {(k, subject): obj for k, task in enumerate(self.tasks) for subject, obj in task.facts}
        fits: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}  # prefix pattern -> (task, rest)
        for k, task in enumerate(self.tasks):
            for template in task.templates:
                cut = template.index(OBJECT)
                fits.setdefault(template[:cut], []).append((k, template[cut + 1:]))
        total = 0.0
        for s in sentences:
            template = self.tasks[s.task].templates[s.template]
            options = Counter((objects[(k, s.subject)], rest) for k, rest in fits[template[:template.index(OBJECT)]]
                              if (k, s.subject) in objects)
            total += max(options.values()) / sum(options.values())
        return total / len(sentences)

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` of this generator, the YAML form (plain data for checkpoints)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": dict(self.init_args)}

class SentenceDataset(Dataset):
    """Padded sentences as next-token examples with the per-token task labels and evaluation masks."""

    def __init__(self, sentences: list[Sentence], seq_len: int, seen_facts: set[tuple[int, int]]) -> None:
        B, S = len(sentences), seq_len
        self.tokens = torch.full((B, S), PAD, dtype=torch.long)
        self.labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
        self.task_ids = torch.full((B, S), -1, dtype=torch.long)
        self.target_mask = torch.zeros(B, S, dtype=torch.bool)
        self.after_subject = torch.zeros(B, S, dtype=torch.bool)
        self.object_pos = torch.zeros(B, dtype=torch.long)
        self.answerable = torch.zeros(B, dtype=torch.bool)
        for b, s in enumerate(sentences):
            n = len(s.tokens)
            self.tokens[b, :n] = torch.tensor(s.tokens)
            self.labels[b, : n - 1] = self.tokens[b, 1:n]
            self.task_ids[b, :n] = s.task
            # Position p predicts token p + 1: the answer starts with the label at object_pos - 1 and ends at EOS.
            self.target_mask[b, s.object_pos - 1 : n - 1] = True
            self.after_subject[b, s.subject_pos + 1 : n] = True
            self.object_pos[b] = s.object_pos - 1
            self.answerable[b] = (s.task, s.subject) in seen_facts

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "tokens": self.tokens[i], "labels": self.labels[i], "task_ids": self.task_ids[i],
            "target_mask": self.target_mask[i], "after_subject": self.after_subject[i],
            "object_pos": self.object_pos[i], "answerable": self.answerable[i],
        }


class TaskRoutingDataModule(pl.LightningDataModule):
    """:class:`TemplateKVTasks` as a DataModule. Validation has two loaders: 0 = the test split, 1 = the training
    split in a fixed order (for train exact match).

    Args:
        tasks: the generator (its arguments are the data set: tasks, templates, pairs, overlap, split, seed; keep
            its seed fixed across training seeds: one data set, as in the paper); default ``TemplateKVTasks()``.
            In YAML: ``tasks: {class_path: lightning_moe.studies.task_routing.TemplateKVTasks, init_args: {...}}``.
        batch_size: sentences per batch.
        eval_batch_size: sentences per validation batch.
        eval_train: also evaluate the training split (validation loader 1).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tasks: TemplateKVTasks | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        eval_train: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_non_negative("num_workers", num_workers)
        if isinstance(tasks, dict):  # from a checkpoint's hyper-parameters
            tasks = TemplateKVTasks(**tasks.get("init_args", {}))
        if tasks is not None and not isinstance(tasks, TemplateKVTasks):
            raise TypeError(f"tasks must be a TemplateKVTasks, got {type(tasks).__name__}.")
        self.tasks = tasks if tasks is not None else TemplateKVTasks()
        self.save_hyperparameters(ignore=["tasks"])
        self.hparams["tasks"] = self.tasks.config()
        self.num_tasks, self.vocab_size = self.tasks.num_tasks, self.tasks.vocab_size
        self.batch_size, self.eval_batch_size, self.eval_train = batch_size, eval_batch_size, eval_train
        self.num_workers = num_workers
        self.splits: dict[str, SentenceDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            t = self.tasks
            self.splits = {name: SentenceDataset(getattr(t, name), t.max_len, t.seen_facts) for name in ("train", "test")}

    def train_dataloader(self) -> DataLoader:
        # The order follows the global seed (seed_everything), so training seeds differ on one fixed data set.
        return DataLoader(self.splits["train"], self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        names = ("test", "train") if self.eval_train else ("test",)
        return [DataLoader(self.splits[n], self.eval_batch_size, num_workers=self.num_workers) for n in names]
