"""TRL as a second backend: the same run trained by TRL's own trainers.

``backend = "trl"`` in a run config makes ``workbench.training.train`` call ``train_trl``: the
same task, model (weights of the same seed), tokenizer, prompts, batch, step count,
learning-rate schedule and KL coefficient, trained by

    sft -> SFTTrainer    rm -> RewardTrainer    dpo, ipo -> DPOTrainer
    grpo -> GRPOTrainer  rloo -> RLOOTrainer    kto -> KTOTrainer
    simpo -> trl.experimental.cpo.CPOTrainer (loss_type "simpo", cpo_alpha 0)
    orpo -> trl.experimental.orpo.ORPOTrainer (its NLL term also counts the prompt tokens)

The run folder has the same files as a workbench run (``config.json``, ``metrics.jsonl``,
``samples.jsonl``, ``status.json``, ``checkpoint/``), and TRL's logged metrics are renamed
to ours where the meaning is the same (``METRIC_NAMES``); every other TRL metric is kept
as ``trl/<name>``. A ``TrainerCallback`` writes one row per update and, every
``eval_every`` updates, measures the trainer's model with the same ``Evaluator`` as the
workbench loop (exact enumeration where the task allows it), so the dashboard and the
reports overlay both backends. PPO, REINFORCE and online DPO have no counterpart in TRL
1.16's core: ``check_config`` refuses them with a message (``ConfigError``).

How the toy task reaches TRL:

- prompts and completions are text ("<bos> p3" and " s1 s0 s2"), one word-level token per
  word, so TRL tokenises exactly our ``Policy.input_ids``;
- online trainers generate ``completion_len`` tokens from the action words only: every
  other token id is in ``generation_kwargs["suppress_tokens"]`` (the tokenizer's EOS
  included, so without an EOS action the length is fixed and the completion mask is all
  ones). TRL's log-probs stay a softmax over the whole vocabulary, its own definition; the
  exact metrics read the action-restricted policy, as for workbench runs;
- the reward function maps the generated token ids back to action indices and calls the
  task's reward (or the reward model), the same ``score`` the workbench loop uses;
- SFT data is passed tokenised, without the EOS TRL would append to text completions; DPO
  and reward-model pairs are text, and TRL appends EOS to each completion (its convention,
  pinned in ``tests/test_trl_parity.py``).

With an EOS action (``task.eos = true``; not for the reward model) the tokenizer's ``eos_token``
is the task's EOS word (``<end>``), so TRL's EOS is the task's: GRPO/RLOO generation stops a
completion at it and TRL masks what follows (its padding, ``pad_token_id``); the generated
completions are padded back with the EOS action to ``completion_len`` for the reward
(``Codec.completions``, ``Task.canonical``). SFT demonstrations and DPO completions reach TRL
cut after their EOS; a DPO completion truncated at max_len (no EOS) gets TRL's appended EOS,
one token more than our mask counts (TRL's every-completion-ends-with-EOS convention).

Unit conversions: TRL logs the KL as a mean per completion token of the batch, ours as a sum
over each completion (mean over sequences), so ``kl/k3_loss`` = TRL's ``kl`` x its
``completions/mean_length`` (T for fixed-length completions).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..analysis.evaluate import Evaluation
from ..config import Backend, ConfigError, Resolved, register_backend
from ..core import seeds
from ..models.policy import (
    ModelConfig,
    Policy,
    RewardModel,
    build_model,
    build_reward_model,
    describe,
    resolve_device,
    word_ids,
)
from ..runtime.context import RunContext, diverged, done, setup_device
from ..runtime.rollout import score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TRL_TRAINERS = {
    "sft": "SFTTrainer",
    "rm": "RewardTrainer",
    "dpo": "DPOTrainer",
    "ipo": "DPOTrainer",
    "grpo": "GRPOTrainer",
    "rloo": "RLOOTrainer",
    "kto": "KTOTrainer",
    "simpo": "CPOTrainer",
    "orpo": "ORPOTrainer",
}
NO_COUNTERPART = {
    "ppo": "TRL 1.16 has no PPO in its core (PPOTrainer moved to trl.experimental and is being removed)",
    "reinforce": (
        "TRL 1.16 has no plain REINFORCE trainer (its RLOOTrainer is REINFORCE with a leave-one-out baseline: "
        "algo 'rloo')"
    ),
    "online_dpo": "TRL 1.16 has no online DPO in its core (OnlineDPOTrainer moved to trl.experimental)",
}

# TRL's logged name -> ours, per algorithm, where the meaning is the same
_COMMON = {"grad_norm": "grad/norm"}
METRIC_NAMES = {
    "grpo": {
        **_COMMON,
        "loss": "loss/policy",
        "reward": "reward/mean",
        "reward_std": "reward/std",
        "clip_ratio/region_mean": "clip/ratio",
    },
    "rloo": {**_COMMON, "reward": "reward/mean", "reward_std": "reward/std"},  # its loss value is a surrogate: trl/loss
    "sft": {**_COMMON, "loss": "loss/sft"},
    "dpo": {
        **_COMMON,
        "loss": "loss/dpo",
        "rewards/chosen": "rewards/chosen",
        "rewards/rejected": "rewards/rejected",
        "rewards/accuracies": "rewards/accuracies",
        "rewards/margins": "rewards/margins",
    },
    "rm": {**_COMMON, "loss": "loss/rm", "accuracy": "rm/accuracy", "margin": "rm/margin"},
}
METRIC_NAMES["ipo"] = METRIC_NAMES["dpo"]
_PAIRWISE = {k: v for k, v in METRIC_NAMES["dpo"].items() if k.startswith("rewards/")}
METRIC_NAMES["kto"] = {**_COMMON, **_PAIRWISE, "loss": "loss/kto", "kl": "kto/kl"}
METRIC_NAMES["simpo"] = {**_COMMON, **_PAIRWISE, "loss": "loss/simpo"}
METRIC_NAMES["orpo"] = {
    **_COMMON,
    **_PAIRWISE,
    "loss": "loss/orpo",
    "nll_loss": "orpo/nll",
    "log_odds_chosen": "orpo/log_odds_ratio",
}
_DROPPED = (
    "learning_rate",
    "epoch",
    "total_flos",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
    "step_time",
)


# -- configuration ------------------------------------------------------------------------------


class NoTRLCounterpart(ConfigError):
    """The algorithm has no trainer in TRL's core: a study can list it as such instead of failing."""

    def __init__(self, algo: str):
        super().__init__(f"backend 'trl': {NO_COUNTERPART[algo]}; use backend 'workbench' for {algo!r}")
        self.algo, self.reason = algo, NO_COUNTERPART[algo]


def check_config(res: Resolved) -> None:
    """Refuse, with a message, what TRL cannot run as configured. Called by ``config.resolve``."""
    name, acfg = res.spec.name, res.algo_cfg
    if name in NO_COUNTERPART:
        raise NoTRLCounterpart(name)
    if name not in TRL_TRAINERS:
        raise ConfigError(f"backend 'trl' has no trainer for {name!r}; supported: {', '.join(sorted(TRL_TRAINERS))}")
    problems = []
    if res.run.model.arch != "gpt2" and res.run.model.impl == "native":
        problems.append("model.impl 'native' is GPT-2 only")
    if res.task.eos_action is not None and name == "rm":
        problems.append("the TRL backend's reward model reads fixed-length completions: set task.eos = false")
    if res.task.has_observations:  # TRL samples and trains on every completion token
        problems.append(f"task {res.task.name!r} has observation tokens the environment writes; TRL cannot mask them")
    if name in ("dpo", "ipo", "rm", "kto", "simpo", "orpo") and acfg.labels == "soft":
        problems.append(f"TRL's {TRL_TRAINERS[name]} takes hard preference labels: set algo.labels = 'sampled'")
    if name == "dpo" and acfg.loss_type == "sigmoid" and acfg.label_smoothing:
        problems.append(
            "TRL 1.16's DPOTrainer ignores label_smoothing with loss_type 'sigmoid' (cDPO): use the workbench backend, "
            "or loss_type 'robust'"
        )
    preference_algos = ("dpo", "ipo", "kto", "simpo", "orpo")
    if name in preference_algos and acfg.pairs == "reference":  # the pairs come from the workbench policy's sampler
        problems.append("pairs sampled from pi_ref are the workbench backend's: set algo.pairs to 'all' or 'random'")
    if name == "grpo":
        if acfg.kl_estimator != "k3":
            problems.append("GRPOTrainer's KL term is the k3 estimator: set algo.kl_estimator = 'k3'")
        if acfg.minibatches != 1:
            problems.append("one minibatch per rollout only (algo.minibatches = 1)")
        if acfg.eps != 1e-4:
            problems.append("GRPOTrainer's std epsilon is fixed at 1e-4 (algo.eps)")
    if name == "rloo":
        if acfg.kl_in != "reward" or acfg.kl_estimator != "k1":
            problems.append("RLOOTrainer puts the k1 KL in the reward: algo.kl_in = 'reward', algo.kl_estimator = 'k1'")
        if acfg.aggregation != "sequence_sum":
            problems.append(
                "RLOOTrainer's loss is a mean over sequences of summed log-probs: algo.aggregation = 'sequence_sum'"
            )
    if name == "kto" and (acfg.batch_size < 2):
        problems.append("KTOTrainer estimates z_ref from a batch: algo.batch_size >= 2")
    if name == "sft" and acfg.aggregation != "token_mean":
        problems.append("SFTTrainer's loss is a mean over completion tokens: algo.aggregation = 'token_mean'")
    if problems:
        raise ConfigError(f"backend 'trl', algo {name!r}: " + "; ".join(problems))


def trl_args(res: Resolved, out_dir: str | Path, batch_size: int, **kw) -> dict:
    """Arguments every TRL config gets: CPU/offline settings and the run's optimiser and schedule."""
    run = res.run
    on_cpu = resolve_device(run.device).type == "cpu"
    return dict(
        output_dir=str(out_dir),
        use_cpu=on_cpu,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=run.seed,
        data_seed=run.seed,
        max_steps=run.steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=run.lr,
        lr_scheduler_type=run.lr_schedule,
        warmup_steps=0,
        weight_decay=run.weight_decay,
        max_grad_norm=run.max_grad_norm,
        optim="adamw_torch",
        logging_steps=1,
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        **kw,
    )


# -- the task as text ---------------------------------------------------------------------------


class Codec:
    """Task indices <-> the text and token ids TRL sees."""

    def __init__(self, task, tokenizer):
        self.task, self.tokenizer = task, tokenizer
        self.action_ids = torch.tensor(word_ids(tokenizer, task.action_words))
        self.prompt_ids = torch.tensor(word_ids(tokenizer, task.prompt_words))
        self.to_action = torch.full((len(tokenizer),), -1, dtype=torch.long)
        self.to_action[self.action_ids] = torch.arange(len(self.action_ids))

    def prompt_text(self, prompt: torch.Tensor) -> str:
        """``<bos> w1 w2``: tokenises to ``Policy.input_ids(prompt)``."""
        bos = [self.tokenizer.bos_token] if self.tokenizer.bos_token is not None else []
        return " ".join(bos + [self.task.prompt_words[i] for i in prompt.tolist()])

    def counted(self, completion: torch.Tensor) -> list[int]:
        """Action indices TRL sees: the whole completion, or with an EOS action the tokens up to and including it."""
        if self.task.eos_action is None:
            return completion.tolist()
        return completion[: int(self.task.lengths(completion[None])[0])].tolist()

    def completion_text(self, completion: torch.Tensor) -> str:
        """`` s1 s0``; with an EOS action the counted words, ending with the EOS word (TRL's ``eos_token``)."""
        return "".join(" " + self.task.action_words[i] for i in self.counted(completion))

    def prefix_ids(self, prompt: torch.Tensor) -> list[int]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.prompt_ids[prompt].tolist()

    def completions(self, completion_ids: list[list[int]]) -> torch.Tensor:
        """Generated token ids ``B x [T]`` -> action indices ``(B, T)``; with an EOS action TRL's completions end
        at their EOS (``B x [<= T]``) and are padded with the EOS action to ``completion_len`` (``Task.canonical``)."""
        eos, T = self.task.eos_action, self.task.completion_len
        if eos is not None:
            if any(len(ids) > T for ids in completion_ids):
                raise RuntimeError(f"TRL generated more than completion_len = {T} tokens")
            pad = int(self.action_ids[eos])
            completion_ids = [list(ids) + [pad] * (T - len(ids)) for ids in completion_ids]
        comps = self.to_action[torch.tensor(completion_ids, dtype=torch.long)]
        if (comps < 0).any():
            raise RuntimeError("TRL generated a token outside the task's action words")
        return self.task.canonical(comps)

    def suppressed(self) -> list[int]:
        """Every token id that is not an action word: kept out of generation."""
        return sorted(set(range(len(self.tokenizer))) - set(self.action_ids.tolist()))


def online_dataset(res: Resolved, codec: Codec):
    """The prompt stream of the run (same generator seed as the workbench loop), as a ``datasets.Dataset``."""
    import datasets  # heavy optional: datasets loads only when a TRL run starts

    run = res.run
    data_gen = seeds.data(run.seed)
    n = max(1, run.steps) * (run.batch_size // run.group_size)
    prompts = res.task.sample_prompts(n, data_gen)
    return datasets.Dataset.from_dict(
        {"prompt": [codec.prompt_text(p) for p in prompts], "prompt_idx": prompts.tolist()}
    )


def offline_dataset(res: Resolved, codec: Codec):
    """The run's fixed dataset (``spec.dataset`` with the workbench seed), as TRL's dataset format."""
    import datasets  # heavy optional: datasets loads only when a TRL run starts

    data_gen = seeds.data(res.run.seed)
    data = res.spec.dataset(res.task, res.algo_cfg, data_gen)
    if res.spec.name == "sft":  # tokenised: no EOS appended, loss on the completion only
        rows = [
            (codec.prefix_ids(p), codec.action_ids[codec.counted(c)].tolist())
            for p, c in zip(data["prompts"], data["completions"], strict=True)
        ]
        return datasets.Dataset.from_dict(
            {
                "input_ids": [p + c for p, c in rows],
                "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in rows],
            }
        )
    if res.spec.name == "kto":  # unpaired rows: prompt, completion, label
        return datasets.Dataset.from_dict(
            {
                "prompt": [codec.prompt_text(p) for p in data["prompts"]],
                "completion": [codec.completion_text(c) for c in data["completions"]],
                "label": [bool(d) for d in data["desirable"]],
            }
        )
    return datasets.Dataset.from_dict(
        {
            "prompt": [codec.prompt_text(p) for p in data["prompts"]],
            "chosen": [codec.completion_text(c) for c in data["chosen"]],
            "rejected": [codec.completion_text(r) for r in data["rejected"]],
        }
    )


class RewardFunction:
    """GRPO/RLOO reward function: generated ids -> action indices -> the run's reward (``train.score``)."""

    def __init__(self, res: Resolved, codec: Codec, rm=None):
        self.res, self.codec, self.rm = res, codec, rm
        self.__name__ = "task_reward"  # TRL names reward functions by __name__
        self.gold: list[float] = []  # gold-reward means since the last log

    def __call__(self, prompts, completions, completion_ids, prompt_idx, **kwargs) -> list[float]:
        p = torch.tensor(prompt_idx, dtype=torch.long)
        c = self.codec.completions(completion_ids)
        with torch.no_grad():
            _, step_rewards, gold = score(self.res, self.rm, p, c)
        self.gold.append(gold.mean().item())
        return step_rewards.sum(-1).tolist()  # the total the workbench advantages see


# -- metrics ------------------------------------------------------------------------------------


def _callback_class():
    from transformers import TrainerCallback  # heavy: transformers loads only when a model is built or converted

    class WorkbenchCallback(TrainerCallback):
        """Writes TRL's logs as workbench metric rows and measures the model every ``eval_every`` updates.

        Row ``s`` holds the measurement of the model before update ``s`` (when due) and the
        statistics of update ``s``, as in ``workbench.training.loop``; the last row (``s = steps``)
        only measures.
        """

        def __init__(self, ctx: RunContext, wrap, reward_fn, per_step, completion_len):
            self.ctx, self.res, self.wrap = ctx, ctx.res, wrap
            self.reward_fn, self.per_step, self.T = reward_fn, per_step, completion_len
            self.names = METRIC_NAMES[self.res.spec.name]
            self.row: dict | None = None
            self.diverged: tuple[int, str] | None = None

        def _measure(self, model, step: int) -> dict:
            last = step == self.res.run.steps
            if not any(m.due(step, last) for m in self.ctx.measures):
                return {}
            was_training = model.training
            model.eval()
            try:
                return self.ctx.measure(self.wrap(model), step)
            finally:
                model.train(was_training)

        def _flush(self) -> None:
            if self.row is None:
                return
            s = self.row["step"]
            self.row["samples"] = s * self.per_step + (self.per_step if s < self.res.run.steps else 0)
            self.ctx.log(self.row)
            self.row = None

        def on_train_begin(self, args, state, control, **kw):
            self.ctx.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            self._flush()
            s = state.global_step
            self.row = {"step": s, **self._measure(model, s)}
            if optimizer is not None:
                self.row["lr"] = optimizer.param_groups[0]["lr"]

        def on_log(self, args, state, control, logs=None, **kw):
            if self.row is None or not logs:
                return
            for k, v in logs.items():
                if k in _DROPPED or k.startswith("rewards/task_reward/") or not isinstance(v, (int, float)):
                    continue
                if k == "kl" and k not in self.names:  # KTO's kl is its z_ref, a sequence sum as ours (kto/kl)
                    # TRL: mean per completion token of the batch; ours: sum over each completion, mean over the
                    # batch = TRL's x the mean completion length (T for fixed-length completions)
                    length = logs.get("completions/mean_length", self.T)
                    if self.res.spec.name == "grpo":
                        self.row["kl/k3_loss"] = v * length
                    elif self.res.spec.name == "rloo":
                        self.row["kl/k1_reward"] = v * length
                    else:
                        self.row["trl/kl"] = v
                    continue
                self.row[self.names.get(k, f"trl/{k}")] = v
            if self.reward_fn is not None and self.reward_fn.gold:
                self.row["reward/gold_mean"] = sum(self.reward_fn.gold) / len(self.reward_fn.gold)
                self.reward_fn.gold.clear()
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                self.diverged = (state.global_step - 1, f"non-finite loss {loss}")
                control.should_training_stop = True

        def on_train_end(self, args, state, control, model=None, **kw):
            self._flush()
            if self.diverged is None:
                self.row = {"step": self.res.run.steps, **self._measure(model, self.res.run.steps)}
                self._flush()

    return WorkbenchCallback


# -- the trainers -------------------------------------------------------------------------------


def _hf_model(task, mcfg: ModelConfig, seed: int):
    """The run's initial policy as a transformers model (a native GPT-2 is converted; same weights)."""
    model, tok = build_model(task, mcfg, seed)
    if not hasattr(model, "generate"):  # workbench.models.native_gpt2.NativeGPT2
        model = model.to_hf()
    return model, tok


def build_trainer(res: Resolved, work: Path, callbacks=(), rm=None):
    """``(trainer, tokenizer, codec, reward_fn)``: the TRL trainer for this run, nothing started.

    ``work`` holds TRL's output_dir and, for GRPO/RLOO, the initial model saved as a local
    directory (TRL rebuilds the reference model from the path when beta > 0).
    """
    import datasets  # heavy optional: datasets loads only when a TRL run starts
    import trl  # heavy optional: TRL loads only when a TRL run starts
    from transformers.utils import (
        logging as hf_logging,  # heavy: transformers loads only when a model is built or converted
    )

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    run, task, name, acfg = res.run, res.task, res.spec.name, res.algo_cfg
    work.mkdir(parents=True, exist_ok=True)
    if name == "rm":
        rmodel = build_reward_model(task, run.model.model_copy(update={"impl": "hf"}), run.seed)
        model, tok = rmodel.model, rmodel.tokenizer
    else:
        model, tok = _hf_model(task, run.model, run.seed)
    if task.eos_action is not None:  # TRL's EOS is the task's EOS action: generation stops there, TRL masks after it
        tok.eos_token = task.action_words[task.eos_action]
    codec = Codec(task, tok)
    out_dir = work / "trl_output"
    reward_fn = None
    if name in ("grpo", "rloo"):
        model_dir = work / "initial_model"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        reward_fn = RewardFunction(res, codec, rm)
        G = run.group_size
        common = dict(
            num_generations=G,
            max_completion_length=task.completion_len,
            temperature=run.temperature,
            beta=run.beta,
            num_iterations=acfg.epochs if name == "grpo" else 1,
            log_completions=False,
            generation_kwargs={"suppress_tokens": codec.suppressed()},
        )
        if run.model.dtype != "float32":
            common["model_init_kwargs"] = {"dtype": run.model.dtype}
        if name == "grpo":
            loss_type = {"sequence_mean": "grpo", "token_mean": "dapo", "constant": "dr_grpo"}.get(acfg.aggregation)
            if loss_type is None:
                raise ConfigError(f"backend 'trl': GRPOTrainer has no aggregation {acfg.aggregation!r}")
            args = trl.GRPOConfig(
                **trl_args(res, out_dir, run.batch_size),
                **common,
                loss_type=loss_type,
                scale_rewards=acfg.scale_rewards,
                epsilon=acfg.clip_eps_low,
                epsilon_high=acfg.clip_eps_high,
                use_bias_correction_kl=acfg.kl_ratio_correction,
            )
            cls = trl.GRPOTrainer
        else:
            args = trl.RLOOConfig(
                **trl_args(res, out_dir, run.batch_size), **common, normalize_advantages=acfg.normalize_advantages
            )
            cls = trl.RLOOTrainer
        trainer = cls(
            model=str(model_dir),
            reward_funcs=reward_fn,
            args=args,
            train_dataset=online_dataset(res, codec),
            processing_class=tok,
            callbacks=list(callbacks),
        )
    elif name == "sft":
        args = trl.SFTConfig(**trl_args(res, out_dir, acfg.batch_size), completion_only_loss=True)
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=offline_dataset(res, codec),
            processing_class=tok,
            callbacks=list(callbacks),
        )
    elif name in ("dpo", "ipo"):
        ref_model, _ = _hf_model(task, run.model, run.seed)
        args = trl.DPOConfig(
            **trl_args(res, out_dir, acfg.batch_size),
            beta=run.beta,
            loss_type=acfg.loss_type,
            label_smoothing=acfg.label_smoothing,
        )
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=ref_model.requires_grad_(False),
            args=args,
            train_dataset=offline_dataset(res, codec),
            processing_class=tok,
            callbacks=list(callbacks),
        )
    elif name == "kto":
        ref_model, _ = _hf_model(task, run.model, run.seed)
        dataset = offline_dataset(res, codec)
        # TRL rotates the KL completions in dataset order within each batch: shuffle the rows once (the run's
        # seed) so the rotated pairs are independent rows, as the workbench draws them
        dataset = dataset.shuffle(seed=run.seed)
        args = trl.KTOConfig(
            **trl_args(res, out_dir, acfg.batch_size),
            beta=run.beta,
            desirable_weight=acfg.desirable_weight,
            undesirable_weight=acfg.undesirable_weight,
        )
        trainer = trl.KTOTrainer(
            model=model,
            ref_model=ref_model.requires_grad_(False),
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=list(callbacks),
        )
    elif name in ("simpo", "orpo"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trl.experimental warns on import
            from trl.experimental.cpo import CPOConfig, CPOTrainer
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        if name == "simpo":
            args = CPOConfig(
                **trl_args(res, out_dir, acfg.batch_size),
                loss_type="simpo",
                cpo_alpha=0.0,
                beta=acfg.beta,
                simpo_gamma=acfg.gamma,
            )
            cls = CPOTrainer
        else:
            args = ORPOConfig(**trl_args(res, out_dir, acfg.batch_size), beta=acfg.lam)
            cls = ORPOTrainer
        trainer = cls(
            model=model,
            args=args,
            train_dataset=offline_dataset(res, codec),
            processing_class=tok,
            callbacks=list(callbacks),
        )
    elif name == "rm":
        args = trl.RewardConfig(**trl_args(res, out_dir, acfg.batch_size))
        trainer = trl.RewardTrainer(
            model=model,
            args=args,
            train_dataset=offline_dataset(res, codec),
            processing_class=tok,
            callbacks=list(callbacks),
        )
    else:  # pragma: no cover - check_config refuses it first
        raise ConfigError(f"backend 'trl' has no trainer for {name!r}")
    from transformers import PrinterCallback  # heavy: transformers loads only when a model is built or converted

    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log dict
    return trainer, tok, codec, reward_fn


def train_trl(res: Resolved, out: str | Path, progress: bool = True) -> dict:
    """Run one configuration with TRL. Returns ``{"status", "step", "final": metrics}`` as ``train``."""
    check_config(res)
    run, task, spec = res.run, res.task, res.spec
    device = setup_device(run)
    ctx = RunContext(res, out, device)
    work = Path(tempfile.mkdtemp(prefix="trl_", dir=ctx.out))
    try:
        rm = None
        if run.reward_model and spec.kind == "online":
            rm = build_reward_model(task, run.model, run.seed, path=run.reward_model).to(device).requires_grad_(False)
        ref = None
        if spec.trains != "reward_model":  # the reference of the exact metrics: the initial policy, on the action words
            ref_model, ref_tok = build_model(task, run.model, run.seed)
            ref = Policy(ref_model, ref_tok, task).to(device).requires_grad_(False).eval()
        trainer, tok, codec, reward_fn = build_trainer(res, work, rm=rm)
        wrapper = (RewardModel if ref is None else Policy)(trainer.model, tok, task).to(device)

        def wrap(m):
            """The trainer's model seen through the workbench interface the evaluator measures."""
            wrapper.model = m
            return wrapper

        ctx.add(Evaluation(res, ref, device, ctx.writer))
        per_step = run.batch_size if spec.kind == "online" else res.algo_cfg.batch_size
        cb = _callback_class()(ctx, wrap, reward_fn, per_step, task.completion_len)
        trainer.add_callback(cb)
        summary = describe(wrap(trainer.model)) if ref is not None else {}
        backend = {"name": "trl", "trainer": TRL_TRAINERS[spec.name], "trl_version": _trl_version()}
        ctx.write_config(summary, backend=backend)
        trainer.train()
        status = done(run.steps) if cb.diverged is None else diverged(*cb.diverged)

        def save(path: Path) -> None:
            trainer.model.save_pretrained(path)
            tok.save_pretrained(path)

        return ctx.finish(status, wrap(trainer.model), save=save)
    finally:
        ctx.writer.close()
        shutil.rmtree(work, ignore_errors=True)


def _trl_version() -> str:
    import trl  # heavy optional: TRL loads only when a TRL run starts

    return trl.__version__


register_backend(Backend("trl", check=check_config, train=train_trl))
