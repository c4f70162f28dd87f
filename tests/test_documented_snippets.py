"""Every Python snippet of README.md and docs/*.md is checked here, the way a user pastes it.

test_documented_commands.py runs the shell commands; this file does the same for the ```python blocks. The blocks of
one file run in order in one namespace, as a user pastes them one after another into one session, from a fresh
folder. Each block is, by the first entry of `CHECKS` whose pattern its text matches:

* **run**: executed, with what cannot run offline on a 2-core CPU swapped out and nothing else changed: Hub model ids
  become tiny pipelines saved to folders, `load_dataset` of a Hub dataset a saved tiny one, the scorers' Hub weights
  tiny random ones, the Hub's upload calls a recorder, `"cuda"` the CPU, and every `AdaptiveDPOConfig` is made small
  after its documented fields are set (`SIZE_FIELDS`: one step, batch 2, 32 px, no bf16). The names the prose hands
  the user (a dataset of pairs, a model) are given (`GIVENS`), and what the block promises is asserted (`expect`);
* **static**: not run (the reason is given, with the test that runs the same path); checked like every block below;
* **sketch**: pseudo-code that shows the shape of the code; its own check compares it with the code it sketches.

Every block that is not a sketch must also pass the static checks: it parses, its imports resolve, each name it uses
is defined by an earlier block of the file, by itself or by the prose (`GIVENS`), and each keyword it passes to a
class or function of the library, diffusers, transformers, datasets or peft is one that callable accepts.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest

from tiny_setup import REPO_ROOT

pytestmark = pytest.mark.slow


# ---- reading the snippets out of the files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    code: str  # dedented
    where: str  # file:line of the opening fence


def python_snippets(path: Path) -> list[Snippet]:
    name, lines, found = path.relative_to(REPO_ROOT).as_posix(), path.read_text().splitlines(), []
    i = 0
    while i < len(lines):
        if re.match(r"\s*```python\s*$", lines[i]):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            found.append(Snippet(textwrap.dedent("\n".join(lines[i + 1 : end])), f"{name}:{i + 1}"))
            i = end
        i += 1
    return found


DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SNIPPETS = {f.relative_to(REPO_ROOT).as_posix(): python_snippets(f) for f in DOC_FILES}
SNIPPETS = {name: snippets for name, snippets in SNIPPETS.items() if snippets}


# ---- what a check is ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    pattern: str  # regex searched in the snippet's code
    kind: str  # "run", "static" or "sketch"
    why: str = ""  # static: why it is not run, and which test runs that path
    expect: Callable | None = None  # run: (namespace, folder) -> None, what the block promises
    sketch: Callable | None = None  # sketch: (code) -> None


def check_for(snippet: Snippet) -> Check | None:
    return next((c for c in CHECKS if re.search(c.pattern, snippet.code)), None)


def _lora_saved(folder: str) -> Callable:
    def expect(namespace, cwd: Path):
        assert (cwd / folder / "pytorch_lora_weights.safetensors").is_file(), f"{folder} has no LoRA weights"
        assert "Diffusion-DPO" in (cwd / folder / "README.md").read_text(), f"{folder} has no model card"
    return expect


def _expect_cached(namespace, cwd: Path):
    assert namespace["trainer"].state.global_step == 1
    assert any((cwd / "latent-cache").iterdir()), "no cache was written to latent-cache"


def _expect_judged(namespace, cwd: Path):
    from datasets import load_from_disk

    judged = load_from_disk(str(cwd / "my-pairs-judged"))
    assert "judge_scores" in judged.column_names and all(len(s) == 2 for s in judged["judge_scores"])
    assert namespace["args"].minority_evidence == "judge"


def _expect_usage(namespace, cwd: Path):
    _lora_saved("sd15-adaptive-dpo")(namespace, cwd)
    _lora_saved("flux-dpo")(namespace, cwd)
    assert "judge_scores" in namespace["pairs"].column_names
    assert namespace["noisy"]["flipped"].count(True) == round(0.2 * len(namespace["noisy"]))
    assert (cwd / "flux-cache").is_dir() and any((cwd / "flux-cache").iterdir())  # the Flux run's latent cache
    assert len(namespace["pipe"].get_active_adapters()) == 1  # the SD LoRA loaded by load_lora_weights
    upload = HUB_UPLOADS[-1]  # trainer.push_to_hub: the model card names the dataset, the weights are uploaded
    assert upload["repo_id"] == "me/flux-dpo" and "pytorch_lora_weights.safetensors" in upload["files"]
    assert "my-org/my-pairs" in upload["card"]


def _expect_judge_known(namespace, cwd: Path):
    assert 0.0 <= namespace["accuracy"] <= 1.0 and 0.0 <= namespace["agreement"] <= 1.0
    assert namespace["trusted"].column_names.count("judge_scores") == 1


def _expect_evaluated(namespace, cwd: Path):
    report = namespace["report"]
    assert set(report["scorers"]) == {"pickscore", "clip"}
    assert 0.0 <= report["scorers"]["pickscore"]["win_rate"] <= 1.0 and (cwd / "sd15-eval" / "results.json").is_file()
    assert namespace["args"].eval_prompts == ["a red bicycle", "a cat in a hat"]


def _sketch_of_compute_loss(code: str):
    """Each function the sketch calls is called by the trainer's compute_loss or the step it delegates to."""
    from trl_adaptive.trainer import AdaptiveDiffusionDPOTrainer

    source = inspect.getsource(AdaptiveDiffusionDPOTrainer)
    called = set(re.findall(r"(\w+)\(", code)) - {"PairStep"}
    missing = sorted(name for name in called if not re.search(rf"\b{name}\(", source))
    assert not missing, f"the sketch calls {missing}, which the trainer does not"


def _sketch_of_robustness_interface(code: str):
    """The listing names every public method of RobustnessMethod, and only those."""
    from trl_adaptive.robustness import RobustnessMethod

    listed = set(re.findall(r"def (\w+)\(", code)) | set(re.findall(r"/ (\w+)\(", code))
    defined = {name for name, value in vars(RobustnessMethod).items()
               if not name.startswith("_") and (callable(value) or isinstance(value, classmethod))}
    assert listed == defined, f"listed only: {sorted(listed - defined)}; not listed: {sorted(defined - listed)}"


CHECKS = [
    Check(r'model="stable-diffusion-v1-5/stable-diffusion-v1-5",\s+# a pipeline object', "run",
          expect=_lora_saved("out")),
    Check(r"pairs\.save_to_disk\(\"my-pairs-judged\"\)", "run", expect=_expect_judged),
    Check(r'cache_dir="latent-cache"', "run", expect=_expect_cached),
    Check(r"report = evaluate\(", "run"),
    Check(r'report_to=\["tensorboard"\], eval_prompts=', "run", expect=_expect_evaluated),
    Check(r"self\.forwards\.pair_forward", "sketch", sketch=_sketch_of_compute_loss),
    Check(r"class RobustnessMethod:", "sketch", sketch=_sketch_of_robustness_interface),
    Check(r'load_dataset\("kashif/pickascore"', "run"),
    Check(r'output_dir="sd15-contrast-filter"', "run"),
    Check(r'minority_evidence="judge", minority_filter_threshold=0\.55', "run"),
    Check(r"implied_flip_rate\(agreement, accuracy\)", "run", expect=_expect_judge_known),
    Check(r"noisy = flip_labels\(pairs", "run"),
    Check(r'"black-forest-labs/FLUX.1-dev",\s+# or a local folder', "run"),
    Check(r'pipe\.load_lora_weights\("sd15-adaptive-dpo"\)', "run"),
    Check(r'from_pretrained\("sd15-adaptive-dpo-full"\)', "static",
          why="the folder is a full fine-tune's output, which no earlier block makes; "
              "tests/test_trainer.py::test_full_fine_tune_saves_a_loadable_pipeline loads one"),
    Check(r'trainer\.push_to_hub\(dataset_name="my-org/my-pairs"\)', "run", expect=_expect_usage),
    Check(r'resume_from_checkpoint="sd15-adaptive-dpo/checkpoint-2000"', "static",
          why="no earlier block runs 2000 steps; tests/test_trainer.py and tests/test_robustness.py resume "
              "checkpoints and compare with an uninterrupted run"),
]

#: What the prose around a file's snippets hands the user, made before its first block runs.
GIVENS = {
    "README.md": lambda stand_ins, cwd: {"pairs": _toy_pairs()},  # "a datasets.Dataset of preference pairs"
    "docs/caching.md": lambda stand_ins, cwd: {"model": stand_ins["sd"], "dataset": _toy_pairs(), "lora": _lora()},
    "docs/minority_filter.md": lambda stand_ins, cwd: _saved(_toy_pairs(), cwd / "my-pairs", cwd / "my-trusted-pairs"),
    "docs/evaluation.md": lambda stand_ins, cwd: _evaluation_givens(stand_ins, cwd),
}
#: The names GIVENS defines, for the static checks (which do not build them).
GIVEN_NAMES = {"README.md": {"pairs"}, "docs/caching.md": {"model", "dataset", "lora"}}

HUB_MODELS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "black-forest-labs/FLUX.1-dev": "flux"}
HUB_DATASETS = ("kashif/pickascore", "yuvalkirstain/pickapic_v2")
#: Set on every AdaptiveDPOConfig after its documented fields: the CPU-sized run.
SIZE_FIELDS = dict(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1, resolution=32,
                   bf16=False, dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)
HUB_UPLOADS: list[dict] = []


def _toy_pairs():
    from trl_adaptive.tiny import toy_preference_dataset

    return toy_preference_dataset(num_pairs=4, size=32, seed=0)


def _lora():
    from tiny_setup import lora_config

    return lora_config()


def _saved(dataset, *folders: Path) -> dict:
    """The user's data saved where the prose says it is ("my-pairs", "my-trusted-pairs")."""
    for folder in folders:
        dataset.save_to_disk(str(folder))
    return {}


def _evaluation_givens(stand_ins, cwd: Path) -> dict:
    """A LoRA trained from the tiny pipeline in "sd15-adaptive-dpo" (the usage guide's run) and a prompts file."""
    from tiny_setup import lora_config, tiny_args
    from trl_adaptive import AdaptiveDiffusionDPOTrainer

    trainer = AdaptiveDiffusionDPOTrainer(stand_ins["sd"], args=tiny_args(cwd / "sd15-adaptive-dpo", max_steps=1),
                                          train_dataset=_toy_pairs(), peft_config=lora_config())
    trainer.train()
    trainer.save_model()
    (cwd / "prompts.txt").write_text("a red square\na blue square\n")
    return {}


# ---- static checks -------------------------------------------------------------------------------------------------


def _bound_names(tree: ast.AST) -> set[str]:
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return bound


def _imports(tree: ast.AST) -> dict[str, object]:
    namespace: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "<imports>", "exec"), namespace)  # an unresolvable import raises here
    namespace.pop("__builtins__", None)
    return namespace


def _accepts(target, keyword: str) -> bool:
    parameters = inspect.signature(target).parameters
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def static_problems(snippets: list[Snippet]) -> list[str]:
    """Undefined names, unresolvable imports and keywords a callable does not accept, in the non-sketch blocks."""
    problems, defined, known, instances = [], set(dir(builtins)), {}, {}
    for snippet in snippets:
        if check_for(snippet) is not None and check_for(snippet).kind == "sketch":
            continue
        defined |= GIVEN_NAMES.get(snippet.where.split(":")[0], set())
        try:
            tree = ast.parse(snippet.code)
        except SyntaxError as error:
            problems.append(f"{snippet.where}: does not parse: {error}")
            continue
        known.update(_imports(tree))
        bound = _bound_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in defined | bound:
                problems.append(f"{snippet.where}: {node.id!r} is not defined by this or an earlier block")
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
                made = known.get(node.value.func.id)
                if inspect.isclass(made):  # `trainer = AdaptiveDiffusionDPOTrainer(...)`: trainer.<method> is checked
                    instances.update({t.id: made for t in node.targets if isinstance(t, ast.Name)})
            if not isinstance(node, ast.Call):
                continue
            target, label = None, ast.unparse(node.func)
            if isinstance(node.func, ast.Name):
                target = known.get(node.func.id)
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                owner = known.get(node.func.value.id) or instances.get(node.func.value.id)
                if owner is not None:
                    if not hasattr(owner, node.func.attr):
                        problems.append(f"{snippet.where}: {label}: {owner.__name__} has no {node.func.attr!r}")
                        continue
                    target = getattr(owner, node.func.attr)
            if target is None or not callable(target):
                continue
            for keyword in node.keywords:
                if keyword.arg is not None and not _accepts(target, keyword.arg):
                    problems.append(f"{snippet.where}: {label}() takes no keyword {keyword.arg!r}")
        defined |= bound
    return problems


# ---- running a file's snippets -------------------------------------------------------------------------------------


def substituted(code: str, stand_ins: dict[str, str]) -> str:
    for hub_id, stand_in in HUB_MODELS.items():
        code = code.replace(f'"{hub_id}"', repr(stand_ins[stand_in]))
    return code.replace('device="cuda"', 'device="cpu"')


class _RecordingHubApi:
    """The Hub calls of `Trainer.push_to_hub`, recorded instead of sent: which repository, which files, the card."""

    def create_repo(self, repo_id, **kwargs):
        return mock.Mock(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        HUB_UPLOADS.append({"repo_id": repo_id, "files": files, "card": Path(folder_path, "README.md").read_text()})
        return mock.Mock()


def run_file(name: str, stand_ins: dict[str, str], cwd: Path) -> dict:
    import datasets

    from trl_adaptive.config import AdaptiveDPOConfig
    from trl_adaptive.evaluation import scorers

    post_init = AdaptiveDPOConfig.__post_init__

    def small(self):
        for field_name, value in SIZE_FIELDS.items():
            setattr(self, field_name, value)
        post_init(self)

    real_load_dataset = datasets.load_dataset

    def load_dataset(path, *args, split=None, **kwargs):
        if path in HUB_DATASETS:
            saved = datasets.load_from_disk(stand_ins["pairs"])
            return saved[split] if split else saved
        return real_load_dataset(path, *args, split=split, **kwargs)

    namespace: dict = {"__name__": "__main__"}
    given = GIVENS.get(name, lambda s, c: {})(stand_ins, cwd) or {}
    assert set(given) == GIVEN_NAMES.get(name, set()), "GIVEN_NAMES (the static checks' view) must match GIVENS"
    namespace.update(given)
    with mock.patch.object(AdaptiveDPOConfig, "__post_init__", small), \
            mock.patch("datasets.load_dataset", load_dataset), \
            mock.patch.dict(scorers.DEFAULT_PATHS, {"pickscore": stand_ins["clip"], "clip": stand_ins["clip"]}), \
            mock.patch("transformers.trainer.hf_api", _RecordingHubApi):
        for snippet in SNIPPETS[name]:
            check = check_for(snippet)
            if check.kind != "run":
                continue
            exec(compile(substituted(snippet.code, stand_ins), snippet.where, "exec"), namespace)
            if check.expect is not None:
                check.expect(namespace, cwd)
    return namespace


# ---- the tests -----------------------------------------------------------------------------------------------------


def test_every_snippet_is_checked():
    unchecked = [s.where for snippets in SNIPPETS.values() for s in snippets if check_for(s) is None]
    assert not unchecked, f"Python snippets with no entry in CHECKS (add one): {unchecked}"
    used = {id(check_for(s)) for snippets in SNIPPETS.values() for s in snippets}
    stale = [c.pattern for c in CHECKS if id(c) not in used]
    assert not stale, f"CHECKS entries that match no snippet any more (remove them): {stale}"
    for check in CHECKS:
        assert check.kind in ("run", "static", "sketch")
        assert (check.kind == "static") == bool(check.why), check.pattern
        assert (check.kind == "sketch") == (check.sketch is not None), check.pattern


def test_static_checks_find_what_they_look_for():
    # The checker itself: a missing import, a misspelt option and a method a class lacks are each reported.
    bad = [Snippet('args = AdaptiveDPOConfig(output_dir="out")', "a.md:1"),
           Snippet('from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer\n'
                   'args = AdaptiveDPOConfig(output_dir="out", minority_filter_treshold=0.5)\n'
                   'trainer = AdaptiveDiffusionDPOTrainer("m", args=args)\ntrainer.trian()', "a.md:3")]
    problems = "\n".join(static_problems(bad))
    assert "a.md:1: 'AdaptiveDPOConfig' is not defined" in problems
    assert "takes no keyword 'minority_filter_treshold'" in problems
    assert "has no 'trian'" in problems
    assert not static_problems([Snippet("from trl_adaptive import flip_labels\nx = flip_labels", "b.md:1")])


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippets_use_real_names_and_options(name):
    problems = static_problems(SNIPPETS[name])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("where", [s.where for snippets in SNIPPETS.values() for s in snippets
                                   if check_for(s) is not None and check_for(s).kind == "sketch"])
def test_sketch_matches_the_code(where):
    snippet = next(s for snippets in SNIPPETS.values() for s in snippets if s.where == where)
    check_for(snippet).sketch(snippet.code)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """Tiny SD and Flux pipelines saved to folders, a saved Pick-a-Pic-style DatasetDict, a tiny CLIP (the scorers)."""
    from datasets import DatasetDict

    from trl_adaptive.tiny import tiny_clip_scorer, tiny_flux_pipeline, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("snippet-stand-ins")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "sd")
    tiny_flux_pipeline(seed=0).save_pretrained(root / "flux")
    pairs = _toy_pairs()
    DatasetDict(train=pairs, validation=pairs).save_to_disk(str(root / "pairs"))
    tiny_clip_scorer(str(root / "clip"))
    return {name: str(root / name) for name in ("sd", "flux", "pairs", "clip")}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n, snippets in SNIPPETS.items()
                                  if any(check_for(s) is not None and check_for(s).kind == "run" for s in snippets)])
def test_documented_snippets_run(name, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh folder: relative output folders land here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_file(name, stand_ins, tmp_path)
