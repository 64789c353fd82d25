"""The config contract shared by every stage: overlays, overrides, strict keys and types."""

import ast
import os
import re

import pytest
import yaml
from conftest import ROOT, load_stage, run_stage

STAGES = ["01_download_data.py", "02_download_model.py", "03_convert_checkpoint.py", "05_train.py"]


REPEATED_BLOCKS = ("shared", "records", "layout")  # the sections a stage repeats from another, to be copied alone


def definitions(filename):
    """{name: (source text, section)} of every top-level function, class and constant of a stage."""
    text = (ROOT / filename).read_text()
    lines, section, out = text.splitlines(), None, {}
    rules = {i: m.group(1) for i, line in enumerate(lines, 1) if (m := re.match(r"# -+ (.+)$", line))}
    for node in ast.parse(text).body:
        names = (
            [node.name] if hasattr(node, "name") else [t.id for t in getattr(node, "targets", []) if hasattr(t, "id")]
        )
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        section = next((rules[i] for i in sorted(rules, reverse=True) if i < first), None)
        for name in names:
            out[name] = ("\n".join(lines[first - 1 : node.end_lineno]), section)
    return out


def test_a_helper_that_stages_repeat_is_the_same_text_in_each():
    """Every function, class or constant of a repeated section (shared, records, layout) is identical, by name,
    in every stage that carries it: each stage carries the subset it calls, never a diverging copy."""
    defs = {f: definitions(f) for f in STAGES}
    repeated = {name for d in defs.values() for name, (_, section) in d.items() if section in REPEATED_BLOCKS}
    for name in sorted(repeated - {"STAGE"}):
        copies = {f: d[name][0] for f, d in defs.items() if name in d}
        assert len(set(copies.values())) == 1, f"{name} differs between {sorted(copies)}"
    assert {f for f, d in defs.items() if "load_config" in d} == set(STAGES)


def test_no_stage_carries_a_definition_it_never_uses():
    for f in STAGES:
        body = ast.parse((ROOT / f).read_text()).body
        for node in body:
            names = (
                [node.name] if hasattr(node, "name") else [getattr(t, "id", None) for t in getattr(node, "targets", [])]
            )
            used = {n.id for other in body if other is not node for n in ast.walk(other) if isinstance(n, ast.Name)}
            assert not {n for n in names if n} - used - {"__doc__"}, f"{f}: {names} defined but never used"


def test_05_stays_within_its_size_budget_and_no_function_of_it_grows_past_70_lines():
    """05 is at most 4,100 lines: a new feature pays for its lines by removing others. Each of its functions, main
    included, is shorter than 70 lines."""
    text = (ROOT / "05_train.py").read_text()
    assert len(text.splitlines()) <= 4100
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno + 1 < 70, f"{node.name}: {node.end_lineno - node.lineno + 1} lines"


def test_stages_import_no_other_file_of_the_project():
    local = {p.stem for p in ROOT.glob("*.py")}
    for f in STAGES:
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", (ROOT / f).read_text(), re.M)
        assert not {i.split(".")[0] for i in imports} & local, f


@pytest.fixture
def cfgmod():
    return load_stage("05_train.py")


def test_later_files_and_overrides_replace_earlier_values(cfgmod, tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  seq_length: 128\n  micro_batch_size: 2\n")
    cfg = cfgmod.load_config([ROOT / "config.yaml", tmp_path / "a.yaml"], ["data.seq_length=64", "seed=7"])
    assert cfg["data"]["seq_length"] == 64 and cfg["data"]["micro_batch_size"] == 2 and cfg["seed"] == 7
    assert cfg["data"]["global_batch_size"] == 64


def test_overrides_parse_yaml_scalars_and_lists(cfgmod):
    cfg = cfgmod.load_config(
        [ROOT / "config.yaml"],
        [
            "model_alignment_strategy.peft.target_modules=[o_proj,down_proj]",
            "trainer.gradient_clip_val=null",
            "model.fuse_qkv=true",
        ],
    )
    c = cfgmod.resolve(cfg, cfgmod.SCHEMA)
    assert c["model_alignment_strategy.peft.target_modules"] == ["o_proj", "down_proj"]
    assert c["trainer.gradient_clip_val"] is None and c["model.fuse_qkv"] is True


def test_unknown_key_is_rejected_with_its_name(cfgmod, tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  seq_lenght: 128\n")
    with pytest.raises(cfgmod.StageError, match=r"a.yaml: unknown key 'data.seq_lenght'"):
        cfgmod.load_config([ROOT / "config.yaml", tmp_path / "a.yaml"], [])
    with pytest.raises(cfgmod.StageError, match=r"command line: unknown key 'trainer.max_step'"):
        cfgmod.load_config([ROOT / "config.yaml"], ["trainer.max_step=3"])


def test_wrong_type_is_rejected_with_key_and_expected_type(cfgmod):
    cfg = cfgmod.load_config([ROOT / "config.yaml"], ["data.seq_length=4k"])
    with pytest.raises(cfgmod.StageError, match=r"'data.seq_length' must be int, got str '4k'"):
        cfgmod.resolve(cfg, cfgmod.SCHEMA)


def test_the_string_False_is_not_a_true_boolean(cfgmod):
    """NxD's converter treats the string "False" as True; here a quoted string is simply the wrong type."""
    cfg = cfgmod.load_config([ROOT / "config.yaml"], ["model.fuse_qkv='False'"])
    with pytest.raises(cfgmod.StageError, match=r"'model.fuse_qkv' must be bool"):
        cfgmod.resolve(cfg, cfgmod.SCHEMA)
    cfg = cfgmod.load_config([ROOT / "config.yaml"], ["model.fuse_qkv=False"])
    assert cfgmod.resolve(cfg, cfgmod.SCHEMA)["model.fuse_qkv"] is False


def test_choices_are_enforced(cfgmod):
    cfg = cfgmod.load_config([ROOT / "config.yaml"], ["precision.type=bf16"])
    with pytest.raises(cfgmod.StageError, match=r"'precision.type' must be one of \['fp32', 'autocast'\]"):
        cfgmod.resolve(cfg, cfgmod.SCHEMA)


def test_paths_expand_home_and_environment(cfgmod, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/srv/data")
    cfg = cfgmod.load_config([ROOT / "config.yaml"], ["data.train_dir=${DATA_ROOT}/t.jsonl"])
    c = cfgmod.resolve(cfg, cfgmod.SCHEMA)
    assert c["data.train_dir"] == "/srv/data/t.jsonl"
    assert not c["exp_manager.resume_from_checkpoint"].startswith("~")
    monkeypatch.delenv("DATA_ROOT")
    with pytest.raises(cfgmod.StageError, match=r"'data.train_dir': an environment variable"):
        cfgmod.resolve(cfgmod.load_config([ROOT / "config.yaml"], ["data.train_dir=${DATA_ROOT}/t"]), cfgmod.SCHEMA)


def test_secrets_are_redacted_but_tokenizer_paths_are_not(cfgmod):
    shown = cfgmod.redacted({"hub.token": "hf_abc", "data.tokenizer.type": "/tok", "s3.secret_key": "x"})
    assert shown == {"hub.token": "***", "data.tokenizer.type": "/tok", "s3.secret_key": "***"}


def test_config_yaml_has_the_tutorial_settings_and_one_sequence_length():
    text = (ROOT / "config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["distributed_strategy"]["tensor_model_parallel_size"] == 32
    assert cfg["distributed_strategy"]["kv_replicator"] == 4
    assert cfg["data"]["seq_length"] == 4096 and cfg["data"]["micro_batch_size"] == 1
    assert cfg["data"]["global_batch_size"] == 64
    assert cfg["model"]["optim"]["lr"] == 1.5e-4 and cfg["model"]["optim"]["sched"]["warmup_steps"] == 10
    assert cfg["trainer"]["max_steps"] == 5000 and cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["model_alignment_strategy"]["peft"] == {
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_bias": "none",
        "use_rslora": False,  # the tutorial's plain LoRA
        "use_dora": False,
        "lora_verbose": True,
        "target_modules": ["qkv_proj"],
    }
    assert cfg["model_alignment_strategy"]["sft"]["packing"] is True
    assert len(re.findall(r"^\s*\w*seq_length\s*:", text, re.M)) == 1  # no second, conflicting sequence length


def test_every_config_key_is_commented():
    for n, line in enumerate((ROOT / "config.yaml").read_text().splitlines(), 1):
        if re.match(r"^\s*\w+:\s*\S", line):
            assert "#" in line, f"config.yaml:{n} has no comment: {line.strip()}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reports_a_bad_config_in_one_line_and_exits_1(stage):
    proc = run_stage([stage, "--config", "config.yaml", "data.nope=1"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: command line: unknown key 'data.nope'"


def test_a_missing_config_file_is_named(tmp_path):
    proc = run_stage(["05_train.py", "--config", str(tmp_path / "none.yaml")], check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {tmp_path / 'none.yaml'}: config file not found"


def test_weight_init_only_false_is_refused_rather_than_ignored(cfgmod):
    c = cfgmod.resolve(
        cfgmod.load_config(
            [ROOT / "config.yaml"],
            ["model.weight_init_only=false", "distributed_strategy.tensor_model_parallel_size=1"],
        ),
        cfgmod.SCHEMA,
    )
    with pytest.raises(cfgmod.StageError, match="weight_init_only: false"):
        cfgmod.check_settings(c)


def test_an_unknown_key_suggests_the_closest_known_keys(cfgmod):
    cases = {
        "trainer.max_step=3": "did you mean 'trainer.max_steps'?",
        "traner.max_steps=3": "did you mean 'trainer'?",
        "trainer.seq_length=128": "did you mean 'data.seq_length'?",
    }
    for override, hint in cases.items():
        with pytest.raises(cfgmod.StageError, match=re.escape(hint)):
            cfgmod.load_config([ROOT / "config.yaml"], [override])


def test_a_yaml_syntax_error_names_file_line_and_column(cfgmod, tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 3\n   log_every_n_steps: 1\n")
    with pytest.raises(cfgmod.StageError, match=rf"{re.escape(str(tmp_path / 'bad.yaml'))}:3:\d+: not valid YAML"):
        cfgmod.load_config([ROOT / "config.yaml", tmp_path / "bad.yaml"], [])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.optim.lr=-1e-4", "'model.optim.lr' must be > 0, got -0.0001"),
        ("model_alignment_strategy.peft.lora_alpha=0", "'model_alignment_strategy.peft.lora_alpha' must be > 0"),
        (
            "model_alignment_strategy.peft.lora_dropout=1.0",
            "'model_alignment_strategy.peft.lora_dropout' must be in [0, 1)",
        ),
        ("data.dev_choose_samples=0", "'data.dev_choose_samples' must be >= 1, got 0"),
        ("model.optim.betas=[0.9,1.0]", "every item of 'model.optim.betas' must be in [0, 1)"),
        ("model.optim.eps=0", "'model.optim.eps' must be > 0"),
        ("model.optim.sched.warmup_steps=-1", "'model.optim.sched.warmup_steps' must be >= 0"),
        ("evaluation.generate.num_prompts=-1", "'evaluation.generate.num_prompts' must be >= 0"),
        ("seed=-1", "'seed' must be in [0, 4294967295]"),
        ("trainer.gradient_clip_val=0", "'trainer.gradient_clip_val' must be > 0"),
    ],
    ids=lambda x: x.split("=")[0] if "=" in x else None,
)
def test_a_value_outside_its_range_is_refused_naming_the_key(cfgmod, override, message):
    with pytest.raises(cfgmod.StageError, match=re.escape(message)):
        cfgmod.resolve(cfgmod.load_config([ROOT / "config.yaml"], [override]), cfgmod.SCHEMA)


def test_null_stays_allowed_where_the_range_says_or_null(cfgmod):
    c = cfgmod.resolve(
        cfgmod.load_config([ROOT / "config.yaml"], ["data.dev_choose_samples=null", "trainer.gradient_clip_val=null"]),
        cfgmod.SCHEMA,
    )
    assert c["data.dev_choose_samples"] is None and c["trainer.gradient_clip_val"] is None


def test_min_lr_above_lr_is_refused(cfgmod):
    c = cfgmod.resolve(cfgmod.load_config([ROOT / "config.yaml"], ["model.optim.sched.min_lr=1e-3"]), cfgmod.SCHEMA)
    with pytest.raises(cfgmod.StageError, match=r"'model.optim.sched.min_lr' \(0.001\) must be <= 'model.optim.lr'"):
        cfgmod.check_settings(c, launched=False)


def config_comments():
    """{dotted key: its comment} for every key line of config.yaml (nesting from indentation)."""
    out, stack = {}, []
    for line in (ROOT / "config.yaml").read_text().splitlines():
        m = re.match(r"^( *)(\w+):(.*)$", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        out[".".join(stack)] = m.group(3).partition("#")[2]
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_key_has_a_range_in_the_schema_and_in_config_yaml(stage):
    schema = load_stage(stage).SCHEMA
    comments = config_comments()
    for key, spec in schema.items():
        kind, _, bounds = spec.partition(" ")
        if kind.rstrip("?") in ("int", "float", "list[float]"):
            assert bounds, f"{stage}: {key} has no range"
            assert bounds in comments[key], f"config.yaml: the comment of {key} does not state '{bounds}'"


def test_the_keys_config_yaml_calls_resumable_are_the_ones_05_lets_change(cfgmod):
    text = (ROOT / "config.yaml").read_text()
    listed = {k.strip() for line in re.findall(r"^#   resumable: (.*)$", text, re.M) for k in line.split(",")}
    assert listed - {""} == cfgmod.RESUMABLE
    assert cfgmod.RESUMABLE <= set(cfgmod.SCHEMA)


def test_overrides_are_taken_before_and_after_the_config_options():
    proc = run_stage(
        [
            "05_train.py",
            "seed=3",
            "--config",
            "config.yaml",
            "trainer.max_steps=7",
            "--config",
            "demo.yaml",
            "data.seq_length=128",
            "--check-config",
        ]
    )
    assert "seed=3" in proc.stdout and "max_steps=7" in proc.stdout and "seq_length=128" in proc.stdout


def test_a_misspelt_option_is_one_line_with_a_suggestion():
    proc = run_stage(["05_train.py", "--config", "config.yaml", "--dry_run"], check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip() == "error: unrecognized arguments: --dry_run; did you mean '--dry-run' for '--dry_run'? "
        "(see --help)"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_the_stage_docstring(stage):
    proc = run_stage([stage, "--help"])
    doc = load_stage(stage).__doc__
    for heading in [doc.splitlines()[0]] + re.findall(r"^(Outputs.*|Commands.*)$", doc, re.M):
        assert heading in proc.stdout, f"{stage} --help lacks {heading!r}"


def test_04_answers_help_and_refuses_an_unknown_key():
    proc = run_stage(["bash", "04_precompile.sh", "--help"])
    assert proc.stdout.startswith("Stage 04: ahead-of-time compilation") and "Usage:" in proc.stdout
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml", "trainer.max_step=3"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: command line: unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?"
    )


def test_settings_show_only_what_differs_from_the_first_config_file():
    alone = run_stage(["05_train.py", "--config", "config.yaml", "--check-config"]).stdout.splitlines()
    assert alone[0] == "settings: config.yaml (as config.yaml)"
    demo = run_stage(["05_train.py", "--config", "config.yaml", "--config", "demo.yaml", "--check-config"]).stdout
    assert "seq_length=256" in demo and "lr=0.002" in demo and "optim.eps" not in demo
    assert len(demo.splitlines()) <= 13  # 12 lines of settings, then the verdict


def test_on_a_host_without_trainium_config_yaml_points_to_the_demo():
    proc = run_stage(
        ["05_train.py", "--config", "config.yaml"],
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "trn1.32xlarge" in line and "make demo" in line and "--config demo.yaml" in line
    assert "distributed_strategy.tensor_model_parallel_size=1" in line


def documented_commands(doc):
    """The commands of a stage's --help "Commands" section: one per label, with its continuation lines."""
    import shlex

    section = doc.split("\nCommands", 1)[1].split("\n", 1)[1]
    joined = re.sub(r"\\\n\s*", " ", section)
    for line in joined.splitlines():
        label, _, command = line.partition(": ")
        if label.strip() and command.strip():
            yield shlex.split(command, comments=True)


def test_every_command_of_05_help_runs_as_printed():
    """Each example of 05's --help is one shell command whose arguments 05 accepts: run through --check-config
    in place of its mode (a comment is a shell comment, never an argument)."""
    commands = list(documented_commands(load_stage("05_train.py").__doc__))
    assert len(commands) >= 8
    for words in commands:
        assert words[0] in ("python", "torchrun") and "05_train.py" in words, words
        args = [w for w in words[words.index("05_train.py") + 1 :] if w not in ("--dry-run", "--smoke")]
        proc = run_stage(["05_train.py", *args, "--check-config"], check=False)
        assert proc.returncode == 0, f"{' '.join(words)}: {proc.stderr[-800:]}"
