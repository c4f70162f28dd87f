"""Every command shown in README.md, docs/*.md and examples/ is exercised here, the way a user runs it.

The commands are read from the files themselves (fenced shell blocks, plain blocks of commands, inline `code` that
starts with a command, the examples' docstrings and the YAML configs' comments), so a command added to the docs
without a check fails `test_every_documented_command_is_checked`. Each command is then, by the first entry of
`CHECKS` that matches it:

* **run**: executed in a fresh process from the repository root, with what cannot run offline on a 2-core CPU
  swapped out and nothing else changed: Hub model ids become tiny pipelines saved to folders, Hub datasets and
  placeholder paths a dataset saved with `save_to_disk`, `--num_processes 8` one process (multi-node: two "nodes" on
  this machine), bf16 off, output folders moved to a temporary folder, and size flags appended (resolution 32, one
  step); a flag given twice takes the last value, so the documented flags are all parsed and used;
* **parse**: too long or GPU-only; its own parser reads the exact documented arguments (option names, choices and
  types are checked) and the files it names must exist, and the reason is given;
* **elsewhere**: run by the named test (which must exist), with the reason.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import yaml

from tiny_setup import REPO_ROOT

pytestmark = pytest.mark.slow

ENTRY_POINTS = ("trl-adaptive", "python", "accelerate", "deepspeed", "bash", "pip")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")


# ---- reading the commands out of the files ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    text: str  # one line, continuation lines joined, comments and surplus blanks removed
    where: str  # file:line


def _clean(line: str) -> str:
    line = re.sub(r"\s+#(\s.*)?$", "", line.strip())  # a trailing "# comment"
    return re.sub(r"\s+", " ", line).strip()


def _joined(lines: list[str]) -> list[tuple[int, str]]:
    """(index of first line, text) of each logical line: backslash continuations joined."""
    out, buffer, start = [], "", 0
    for i, line in enumerate(lines):
        if not buffer:
            start = i
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        out.append((start, buffer + line))
        buffer = ""
    return out


def _is_command(text: str) -> bool:
    return text.split(" ", 1)[0] in ENTRY_POINTS


def markdown_commands(path: Path) -> list[Command]:
    name, lines, found = path.relative_to(REPO_ROOT).as_posix(), path.read_text().splitlines(), []
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*```(\w*)", lines[i])
        if not fence:
            for code in re.findall(r"`([^`\n]+)`", lines[i]):  # inline code that is a command
                if _is_command(_clean(code)) and " " in code:
                    found.append(Command(_clean(code), f"{name}:{i + 1}"))
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        language = fence.group(1)
        if language in SHELL_LANGUAGES or language == "":
            for offset, text in _joined(lines[i + 1 : end]):
                text = _clean(text)
                if text and not text.startswith("#") and (language or _is_command(text)):
                    found.append(Command(text, f"{name}:{i + 2 + offset}"))
        i = end + 1
    return found


def example_commands(path: Path) -> list[Command]:
    """Commands in an example script's docstring, or in the comments of a YAML config."""
    name = path.relative_to(REPO_ROOT).as_posix()
    if path.suffix == ".py":
        lines = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()
    else:
        lines = [re.sub(r"^#\s?", "", line) if line.startswith("#") else "" for line in path.read_text().splitlines()]
    return [
        Command(_clean(text), f"{name}:{offset + 1}")
        for offset, text in _joined(lines)
        if _is_command(_clean(text))
    ]


def documented_commands() -> list[Command]:
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    commands = [c for f in files for c in markdown_commands(f)]
    examples = sorted(glob.glob(str(REPO_ROOT / "examples" / "**" / "*.py"), recursive=True))
    examples += sorted(glob.glob(str(REPO_ROOT / "examples" / "**" / "*.yaml"), recursive=True))
    return commands + [c for f in examples for c in example_commands(Path(f))]


# ---- what a check is -----------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    pattern: str  # regex searched in the command's text
    kind: str  # "run", "parse" or "elsewhere"
    why: str = ""
    action: Callable | None = None  # run: (commands, fixtures, tmp_path); parse: (command)
    test: str = ""  # elsewhere: tests/FILE.py::test_name
    commands: list[Command] = field(default_factory=list)


def assign(commands: list[Command]) -> tuple[dict[str, Check], list[Command]]:
    """Each command to the first check whose pattern it matches (the same text once); the commands none matches."""
    checks = {c.name: Check(**{k: v for k, v in c.__dict__.items() if k != "commands"}) for c in CHECKS}
    unmatched = []
    for command in commands:
        check = next((c for c in checks.values() if re.search(c.pattern, command.text)), None)
        if check is None:
            unmatched.append(command)
        elif command.text not in {c.text for c in check.commands}:
            check.commands.append(command)
    return checks, unmatched


# ---- running a command as a user would --------------------------------------------------------------------------

#: What cannot be had offline, and the stand-in each test uses.
HUB_MODELS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
              "stabilityai/stable-diffusion-3.5-medium": "sd3", "black-forest-labs/FLUX.1-dev": "flux"}
DATASETS = ("yuvalkirstain/pickapic_v2", "kashif/pickascore", "/path/to/pickapic", "/data/pickapic_v2")
#: Appended to the commands of the training entry points (transformers' parser: the last of a repeated flag wins).
TRAIN_SIZE_FLAGS = [
    "--resolution", "32", "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
    "--bf16", "false", "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "true",
    "--save_strategy", "no",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(tmp_path: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",  # DeepSpeed's CPU accelerator: there is no GPU here
        HF_HOME=str(tmp_path / "hf-home"),  # no accelerate default config of this machine's user
        MPLBACKEND="Agg",
    )  # fmt: skip
    env.update(extra)
    return env


def _executable(name: str) -> str:
    if name == "python":
        return sys.executable
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else shutil.which(name) or name


def substitute(tokens: list[str], fixtures: dict[str, str], tmp_path: Path) -> list[str]:
    """Hub ids and placeholder paths swapped for local stand-ins; output and cache folders moved under `tmp_path`."""
    out = []
    for i, token in enumerate(tokens):
        if token in HUB_MODELS:
            token = fixtures[HUB_MODELS[token]]
        elif token in DATASETS:
            token = fixtures["pairs"]
        elif i > 0 and tokens[i - 1] in ("--output_dir", "--output-dir", "--cache_dir") and not os.path.isabs(token):
            token = str(tmp_path / token)
        out.append(token)
    return out


def run(argv: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    argv = [_executable(argv[0]), *argv[1:]]
    result = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def assert_saved_a_model(folder: Path) -> None:
    files = set(os.listdir(folder))
    assert {"pytorch_lora_weights.safetensors", "model_index.json"} & files, sorted(files)
    assert "README.md" in files  # the model card


def _accelerate_launch(tokens: list[str], port: int) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` on this CPU: one process, no bf16 (the YAMLs ask for it), a free port."""
    options, script_at = tokens[:2], next(i for i, t in enumerate(tokens) if t.endswith(".py") or t == "-m")
    launch_flags = tokens[2:script_at]
    if "--num_processes" in launch_flags:
        launch_flags[launch_flags.index("--num_processes") + 1] = "1"
    else:  # the YAMLs say 8
        launch_flags += ["--num_processes", "1"]
    extra_env = {}
    if any(t.endswith("multi_gpu.yaml") for t in launch_flags):
        extra_env["ACCELERATE_USE_CPU"] = "true"  # MULTI_GPU without GPUs: run on the CPU
    launch_flags += ["--mixed_precision", "no", "--main_process_port", str(port)]
    return options + launch_flags + tokens[script_at:], extra_env


def _deepspeed_launch(tokens: list[str], port: int) -> list[str]:
    """DeepSpeed's launcher on one node of this machine: no hostfile, one process, a free port."""
    from deepspeed.launcher.runner import parse_args

    script_at = len(tokens) - len(parse_args(tokens[1:]).user_args) - 1  # the script (or module) name
    launcher, rest = tokens[1:script_at], tokens[script_at:]
    kept, i = [], 0
    while i < len(launcher):
        if launcher[i] in ("--hostfile", "--num_nodes", "--num_gpus", "--master_port"):
            i += 2
            continue
        kept.append(launcher[i])
        i += 1
    return ["deepspeed", *kept, "--num_gpus", "1", "--master_port", str(port), *rest]


def run_training_command(commands, fixtures, tmp_path):
    """`trl-adaptive train`, `examples/train_dpo.py`, `examples/train_sd15_pickapic.py`, directly or through
    `accelerate launch` (each shipped YAML) or DeepSpeed's launcher with the shipped JSON."""
    for k, command in enumerate(commands):
        out = tmp_path / f"out-{k}"
        tokens = substitute(shlex.split(command.text.replace("...same arguments...", "").replace(" ...", "")),
                            fixtures, tmp_path)
        tokens = ["examples/train_dpo.py" if t == "train.py" else t for t in tokens]  # the YAMLs' placeholder
        env_extra = {}
        if tokens[0] == "accelerate":
            tokens, env_extra = _accelerate_launch(tokens, _free_port())
        if tokens[0] == "deepspeed":
            tokens = _deepspeed_launch(tokens, _free_port())
        if any(t.endswith("train_sd15_pickapic.py") for t in tokens):
            size = ["--model", fixtures["sd"], "--output_dir", str(out), "--max_steps", "1", "--resolution", "32",
                    "--batch_size", "2", "--gradient_accumulation_steps", "1"]  # fmt: skip
        else:
            size = [*TRAIN_SIZE_FLAGS, "--output_dir", str(out)]
            if "--model_name_or_path" not in tokens:  # the YAML names a Hub id, or the command leaves it to "..."
                size += ["--model_name_or_path", fixtures[HUB_MODELS.get(_config(tokens).get("model_name_or_path"), "sd")]]
            if _config(tokens).get("cache_dir"):  # a relative folder of the YAML: kept out of the repository
                size += ["--cache_dir", str(tmp_path / f"cache-{k}")]
            if "--dataset_name" not in tokens:
                size += ["--dataset_name", fixtures["pairs"]]
        run(tokens + size, _environment(tmp_path, **env_extra))
        assert_saved_a_model(out)
        family = HUB_MODELS.get(_config(tokens).get("model_name_or_path"))
        if family in ("sd3", "flux"):  # what the user does next: load the LoRA into the family's pipeline
            from diffusers import DiffusionPipeline

            pipeline = DiffusionPipeline.from_pretrained(fixtures[family])
            pipeline.load_lora_weights(str(out))
            assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())


def _config(tokens: list[str]) -> dict:
    """The YAML a command passes with --config ({} without one)."""
    if "--config" not in tokens:
        return {}
    return yaml.safe_load((REPO_ROOT / tokens[tokens.index("--config") + 1]).read_text())


def _one_node_arguments(where: str, fixtures, tmp_path) -> list[str]:
    """The script arguments of the last one-node `accelerate launch --config_file` command before `where` in its file
    (what the multi-node command's "...same arguments..." stands for), after the script or `-m module command`."""
    file, line = where.rsplit(":", 1)
    before = [c for c in ASSIGNED["accelerate-config"].commands
              if c.where.rsplit(":", 1)[0] == file and int(c.where.rsplit(":", 1)[1]) < int(line)]
    one_node = max(before, key=lambda c: int(c.where.rsplit(":", 1)[1]))
    tokens = substitute(shlex.split(one_node.text), fixtures, tmp_path)
    at = next(i for i, t in enumerate(tokens) if t.endswith(".py") or t == "-m")
    arguments = tokens[at + (1 if tokens[at].endswith(".py") else 3):]
    if "--model_name_or_path" not in arguments and tokens[at] == "-m":  # the YAML names a Hub id
        arguments += ["--model_name_or_path", fixtures[HUB_MODELS.get(_config(tokens).get("model_name_or_path"), "sd")]]
    return arguments


def run_multi_node(commands, fixtures, tmp_path):
    """Two "nodes" on this machine, one process each, rendezvous on localhost; the script arguments are those of
    the one-node command before it in the same file (its "...same arguments...")."""
    for k, command in enumerate(commands):
        script_args = _one_node_arguments(command.where, fixtures, tmp_path)
        port, out = _free_port(), tmp_path / f"multi-node-{k}"
        processes = []
        for rank in (0, 1):
            text = command.text.replace("$NODE_RANK", str(rank)).replace("$NODE0_ADDRESS", "127.0.0.1")
            tokens = shlex.split(text.replace("...same arguments...", ""))
            tokens[tokens.index("--num_processes") + 1] = "2"  # one process per node
            tokens[tokens.index("--main_process_port") + 1] = str(port)
            tokens = tokens[:2] + ["--mixed_precision", "no"] + tokens[2:]
            argv = [_executable("accelerate"), *tokens[1:], *script_args, *TRAIN_SIZE_FLAGS,
                    "--per_device_train_batch_size", "1", "--output_dir", str(out),
                    "--ddp_backend", "gloo"]  # fmt: skip  (gloo: CPU processes; on GPUs accelerate picks NCCL)
            # MULTI_GPU without GPUs: run on the CPU (as `_accelerate_launch` does for one node).
            extra = {"ACCELERATE_USE_CPU": "true"} if "multi_gpu.yaml" in command.text else {}
            processes.append(subprocess.Popen(argv, env=_environment(tmp_path, **extra), cwd=REPO_ROOT, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [p.communicate(timeout=600)[0] for p in processes]
        for p, output in zip(processes, outputs):
            assert p.returncode == 0, output[-5000:]
        assert_saved_a_model(out)


def run_cli_help(commands, fixtures, tmp_path):
    for command in commands:
        text = run(shlex.split(command.text), _environment(tmp_path)).stdout
        for flag in ("--beta", "--adaptive", "--model_name_or_path", "--skip_bad_rows", "--check_images"):
            assert flag in text, flag


def run_example(commands, fixtures, tmp_path):
    for command in commands:
        output = run([*shlex.split(command.text), "--max_steps", "2", "--output_dir", str(tmp_path / "example")],
                     _environment(tmp_path)).stdout
        assert "LoRA saved to" in output


def run_step_time_cpu(commands, fixtures, tmp_path):
    """The CPU step-time benchmark, with two timed steps per case instead of 16 (every documented case runs)."""
    for k, command in enumerate(commands):
        out = tmp_path / f"step-time-{k}.json"
        run([*shlex.split(command.text), "--batch", "2", "--rank", "4", "--steps", "2", "--warmup", "1",
             "--interval", "2", "--rounds", "1", "--json", str(out)], _environment(tmp_path))  # fmt: skip
        assert out.is_file()


def run_step_time_flops(commands, fixtures, tmp_path):
    """The GPU step-time commands on the real architectures, FLOP counting only (meta device, seconds)."""
    if not (REPO_ROOT.parent / "shared" / "model-configs").is_dir():
        pytest.skip("../shared/model-configs is not beside the checkout")
    for command in commands:
        output = run([*shlex.split(command.text), "--flops-only"], _environment(tmp_path)).stdout
        assert "TFLOP" in output or "FLOP" in output


def run_evaluate(commands, fixtures, tmp_path):
    """`trl-adaptive evaluate` on a LoRA trained from the tiny pipeline, with random-weight scorers saved to a folder
    (the Hub's scorers swapped for it with --scorer-path), two sampling steps at 32 px."""
    from trl_adaptive.evaluation import BUILTIN_PROMPT_SETS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    weights = {"hpsv2": fixtures["hpsv2"], "hpsv2.1": fixtures["hpsv2"], "imagereward": fixtures["imagereward"]}
    for command in commands:
        tokens = substitute(shlex.split(command.text), fixtures, tmp_path)
        tokens[tokens.index("--model") + 1] = fixtures["lora"]
        if tokens[tokens.index("--prompts") + 1] not in BUILTIN_PROMPT_SETS:  # a built-in set runs as it is
            tokens[tokens.index("--prompts") + 1] = str(prompts)
        for option in ("--sample-prompts", "--max-prompts"):  # fewer prompts, same code path
            if option in tokens:
                tokens[tokens.index(option) + 1] = "3"
        names = tokens[tokens.index("--scorers") + 1].split(",")
        paths = [arg for name in names for arg in ("--scorer-path", f"{name}={weights.get(name, fixtures['clip'])}")]
        run([*tokens, *paths, "--aesthetic-head", fixtures["aesthetic_head"], "--steps", "2", "--resolution", "32",
             "--resamples", "100", "--no-progress"], _environment(tmp_path))  # fmt: skip
        out = Path(tokens[tokens.index("--output-dir") + 1])
        assert all((out / name).is_file() for name in ("results.md", "results.json", "grid.png"))


def run_gap_bootstrap(commands, fixtures, tmp_path):
    """Statistics over the committed result files: runs as documented."""
    for command in commands:
        assert "| method | flips |" in run(shlex.split(command.text), _environment(tmp_path)).stdout  # a table


# ---- parsing a command with its own parser ---------------------------------------------------------------------


class Parsed(Exception):
    """Raised by the patched `ArgumentParser.parse_args` once the command's own parser has read its arguments."""


def parsed_by_own_parser(argv_main: Callable[[], object]) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            argv_main()
        except Parsed as done:
            return done.args[0]
    raise AssertionError("the command never parsed its arguments")


def parse_python_command(command: Command) -> None:
    tokens = shlex.split(command.text)
    if tokens[0] == "trl-adaptive":
        from trl_adaptive import cli

        parsed_by_own_parser(lambda: cli.main(tokens[1:]))
        return
    assert tokens[0] == "python", command
    if tokens[1] == "-m":
        target, args = tokens[2], tokens[3:]
        with mock.patch.object(sys, "argv", [target, *args]):
            parsed_by_own_parser(lambda: runpy.run_module(target, run_name="__main__", alter_sys=True))
        return
    script = REPO_ROOT / tokens[1]
    assert script.is_file(), f"{command.where}: {tokens[1]} does not exist"
    with mock.patch.object(sys, "argv", [str(script), *tokens[2:]]):
        parsed_by_own_parser(lambda: runpy.run_path(str(script), run_name="__main__"))


def parse_gpu_step_time_script(command: Command) -> None:
    """The GPU benchmark script: valid bash, and every step_time.py call it would make (listed by its DRY_RUN=1 mode,
    into a temporary folder) parses."""
    import tempfile

    tokens = shlex.split(command.text)
    script = REPO_ROOT / tokens[1]
    subprocess.run(["bash", "-n", str(script)], check=True)
    tiny = tokens[2:3] == ["--tiny"]
    rest = tokens[3:] if tiny else tokens[2:]
    configs = rest[1:2] or ["../shared/model-configs"]
    with tempfile.TemporaryDirectory() as out:
        listed = subprocess.run(["bash", str(script), *(["--tiny"] if tiny else []), out, *configs], check=True,
                                env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True).stdout
    calls = re.findall(r"^== \S+ \(\d+s elapsed\): (python benchmarks/step_time\.py .*)$", listed, re.M)
    assert calls, listed
    for call in calls:
        parse_python_command(Command(call, command.where))


def run_deepspeed_hostfile(commands, fixtures, tmp_path):
    """The multi-node DeepSpeed launch: its launcher flags parse as documented, then it runs on one node of this
    machine (a hostfile of several nodes needs them), with the script arguments of the one-node command."""
    from deepspeed.launcher.runner import parse_args

    one_node = next(c for c in ASSIGNED["accelerate-config"].commands if c.where.startswith("docs/distributed.md"))
    same_arguments = one_node.text.split(".py ", 1)[1]
    for command in commands:
        options = parse_args(shlex.split(command.text.replace("...same arguments...", ""))[1:])
        assert (options.num_nodes, options.num_gpus, options.hostfile) == (2, 8, "hostfile")
        text = command.text.replace("...same arguments...", same_arguments)
        run_training_command([Command(text, command.where)], fixtures, tmp_path)


# ---- the checks, first match wins ------------------------------------------------------------------------------

CHECKS = [
    Check("readme-demo", r"^(pip install \S+ -e \S+ && )?trl-adaptive demo$", "elsewhere",
          test="tests/test_digits_demo.py::test_quick_demo_writes_complete_outputs",
          why="the full grid takes ~16 minutes; the test runs the same command with --quick through the console script"),
    Check("readme-tests", r"^pip install .* && python -m pytest -q tests$", "elsewhere",
          test="tests/test_repo.py::test_ci_runs_the_readme_test_command", why=".ci/run runs exactly this command"),
    Check("pip-install", r"^pip install ", "parse", why="installs packages; the extras it names must exist",
          action=lambda c: _check_pip_extras(c)),
    Check("train-help", r"^trl-adaptive train --help$", "run", action=run_cli_help),
    Check("example", r"^trl-adaptive example$", "run", action=run_example),
    Check("multi-node", r"^accelerate launch .*--num_machines 2", "run", action=run_multi_node),
    Check("launch-in-prose", r"^accelerate launch( --num_processes 2)?$", "elsewhere",
          test="tests/test_distributed.py::test_two_processes_ddp_equal_one_process",
          why="named in prose; the distributed tests launch two processes with DDP and ZeRO-3"),
    Check("named-in-prose", r"^trl-adaptive (train|evaluate)$", "elsewhere",
          test="tests/test_documented_commands.py::test_documented_command_runs",
          why="named in prose; the documented forms run in `train-cli`, `accelerate-module`, `deepspeed-launcher` "
          "and `evaluate`"),
    Check("deepspeed-hostfile", r"^deepspeed --hostfile", "run", action=run_deepspeed_hostfile,
          why="two nodes by hostfile: its flags parse as documented, and it runs on one node"),
    Check("deepspeed-launcher", r"^deepspeed ", "run", action=run_training_command),
    Check("accelerate-config", r"^accelerate launch --config_file \S+\.yaml", "run", action=run_training_command),
    Check("accelerate-module", r"^accelerate launch (-m trl_adaptive\.cli train|examples/)", "run",
          action=run_training_command),
    Check("train-cli", r"^trl-adaptive train --config", "run", action=run_training_command),
    Check("example-scripts", r"^python examples/(train_dpo|train_sd15_pickapic)\.py", "run",
          action=run_training_command),
    Check("gpu-check-tiny", r"^python scripts/gpu_check\.py --tiny$", "elsewhere",
          test="tests/test_gpu_check.py::test_gpu_check_tiny_runs_every_case", why="that test runs it with --json"),
    Check("gpu-check", r"^python scripts/gpu_check\.py", "parse", action=parse_python_command,
          why="needs a GPU (real SD 1.5 / SDXL sizes); `--tiny` runs every case on CPU in tests/test_gpu_check.py"),
    Check("gpu-step-time-script", r"^bash benchmarks/gpu_step_time\.sh", "parse", action=parse_gpu_step_time_script,
          why="needs a GPU (nvidia-smi, real sizes)"),
    Check("step-time-flops", r"^python benchmarks/step_time\.py --arch-dir \S+ --flops-only$", "run",
          action=run_step_time_flops),
    Check("step-time-gpu", r"^python benchmarks/step_time\.py --arch-dir", "run", action=run_step_time_flops,
          why="GPU sizes: run with --flops-only appended (the real architectures on the meta device)"),
    Check("step-time-cpu", r"^python benchmarks/step_time\.py", "run", action=run_step_time_cpu),
    Check("evaluate", r"^trl-adaptive evaluate ", "run", action=run_evaluate),
    Check("gap-bootstrap", r"^python benchmarks/gap_bootstrap\.py docs/", "run", action=run_gap_bootstrap),
    Check("research-runs", r"^(trl-adaptive demo .+|python -m trl_adaptive\.demo .+|python benchmarks/\w+\.py\b.*)$",
          "parse", action=parse_python_command,
          why="the benchmark runs behind docs/results.md take 15 minutes to hours on 2 cores; the quick demo and the "
          "benchmark tests run the same code paths"),
]


def _check_pip_extras(command: Command) -> None:
    setup = (REPO_ROOT / "setup.py").read_text()
    for extras in re.findall(r"\.\[([\w,]+)\]", command.text):
        for extra in extras.split(","):
            assert f'"{extra}":' in setup, f"{command.where}: setup.py has no extra {extra!r}"


# ---- the tests -------------------------------------------------------------------------------------------------

ASSIGNED, UNMATCHED = assign(documented_commands())


def test_every_documented_command_is_checked():
    """Every command matches a check, and every check still has a documented command."""
    assert not UNMATCHED, "documented commands no test checks:\n" + "\n".join(f"  {c.where}: {c.text}" for c in UNMATCHED)
    unused = [name for name, check in ASSIGNED.items() if not check.commands]
    assert not unused, f"checks whose commands are no longer documented: {unused}"
    assert sum(len(c.commands) for c in ASSIGNED.values()) >= 40


def test_the_reader_finds_commands_in_every_kind_of_place():
    where = {c.where.split(":")[0] for check in ASSIGNED.values() for c in check.commands}
    for name in ("README.md", "docs/usage.md", "docs/distributed.md", "docs/performance.md", "docs/results.md",
                 "examples/train_dpo.py", "examples/train_sd15_pickapic.py",
                 "examples/accelerate_configs/deepspeed_zero3.yaml", "examples/configs/sd15_lora.yaml"):
        assert name in where, name


@pytest.mark.parametrize("name", [n for n, c in ASSIGNED.items() if c.kind == "elsewhere"])
def test_commands_run_elsewhere_name_a_real_test(name):
    path, test = ASSIGNED[name].test.split("::")
    assert re.search(rf"^def {test}\(", (REPO_ROOT / path).read_text(), re.M), ASSIGNED[name].test


@pytest.mark.parametrize("name", [n for n, c in ASSIGNED.items() if c.kind == "parse"])
def test_documented_command_parses(name):
    for command in ASSIGNED[name].commands:
        ASSIGNED[name].action(command)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    """Stand-ins of what a user downloads: tiny SD and SDXL pipelines saved to folders, a saved Pick-a-Pic-style
    DatasetDict with the splits the docs name."""
    from datasets import DatasetDict

    from trl_adaptive.tiny import (
        tiny_flux_pipeline,
        tiny_sd3_pipeline,
        tiny_sd_pipeline,
        tiny_sdxl_pipeline,
        toy_preference_dataset,
    )

    root = tmp_path_factory.mktemp("stand-ins")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "sd")
    tiny_sdxl_pipeline(seed=0).save_pretrained(root / "sdxl")
    tiny_sd3_pipeline(seed=0).save_pretrained(root / "sd3")
    tiny_flux_pipeline(seed=0).save_pretrained(root / "flux")
    pairs = toy_preference_dataset(num_pairs=4, size=32, seed=0)
    DatasetDict(train=pairs, validation=pairs).save_to_disk(str(root / "pairs"))
    return {name: str(root / name) for name in ("sd", "sdxl", "sd3", "flux", "pairs")}


@pytest.fixture(scope="module")
def evaluation_fixtures(fixtures, tmp_path_factory) -> dict[str, str]:
    """For `trl-adaptive evaluate`: a LoRA trained two steps from the tiny pipeline, random-weight CLIP scorers, and
    random-weight HPSv2 / ImageReward releases in their authors' layouts."""
    from safetensors.torch import save_file

    from tiny_setup import lora_config, tiny_args
    from trl_adaptive import AdaptiveDiffusionDPOTrainer
    from trl_adaptive.evaluation.scorers import AestheticHead
    from trl_adaptive.tiny import (
        tiny_clip_scorer,
        tiny_hpsv2_checkpoint,
        tiny_imagereward_checkpoint,
        toy_preference_dataset,
    )

    root = tmp_path_factory.mktemp("evaluation")
    trainer = AdaptiveDiffusionDPOTrainer(fixtures["sd"], args=tiny_args(root / "lora"),
                                          train_dataset=toy_preference_dataset(8), peft_config=lora_config())
    trainer.train()
    trainer.save_model()
    clip = tiny_clip_scorer(str(root / "clip"), projection_dim=16)
    save_file(AestheticHead(16).state_dict(), str(root / "head.safetensors"))
    hps = tiny_hpsv2_checkpoint(str(root / "hps"))
    tiny_hpsv2_checkpoint(hps, seed=1, filename="HPS_v2.1_compressed.pt")
    return {**fixtures, "lora": str(root / "lora"), "clip": clip, "aesthetic_head": str(root / "head.safetensors"),
            "hpsv2": hps, "imagereward": tiny_imagereward_checkpoint(str(root / "imagereward"))}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", [n for n, c in ASSIGNED.items() if c.kind == "run"])
def test_documented_command_runs(name, request, tmp_path):
    fixtures = request.getfixturevalue("evaluation_fixtures" if name == "evaluate" else "fixtures")
    ASSIGNED[name].action(ASSIGNED[name].commands, fixtures, tmp_path)
