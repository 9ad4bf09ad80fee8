"""The example third-party labeler (plugins/rlhf-pl-brevity-labeler) as a user would meet it: labelers
are plugins built from the registry, whoever provides them.

The package is pip-installed into a temporary directory (``--target``), never into the test
environment; every check runs in a subprocess with that directory on ``PYTHONPATH``, so the entry
point is discovered exactly as for a pip-installed package.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from process_helpers import Installed, install_plugin

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SRC = REPO / "plugins" / "rlhf-pl-brevity-labeler"
DIST_NAMES = ("rlhf-pl-brevity-labeler", "rlhf_pl_brevity_labeler")  # as written, and as pip may normalise it


def brevity_ranking(completions: list[str], max_words: int) -> list:
    """The brevity rule, written out independently of the package: fewest whitespace words first,
    equal counts tie; empty and over-long completions share the last place. In the data files'
    format (best first, an inner list is a tie, its indices ascending)."""
    counts = [len(text.split()) for text in completions]
    keys = [n if 1 <= n <= max_words else max_words + 1 for n in counts]
    groups = [[i for i, key in enumerate(keys) if key == value] for value in sorted(set(keys))]
    return [group[0] if len(group) == 1 else group for group in groups]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    inst = install_plugin(PLUGIN_SRC, tmp_path_factory.mktemp("brevity"))
    assert (inst.site / "rlhf_pl_brevity_labeler" / "labeler.py").is_file()
    return inst


def test_not_visible_without_the_install(tmp_path):
    """The main environment does not have it: the checks below see the temp install only."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl.plugins"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # (the rule labeler's description mentions brevity: look for the plugin's row and package)
    assert " brevity " not in proc.stdout and not any(name in proc.stdout for name in DIST_NAMES), proc.stdout


def test_listed_with_its_package_and_shown_in_help(installed, tmp_path):
    rows = installed.listed_rows("brevity", tmp_path)
    assert len(rows) == 1 and "labeler" in rows[0], rows
    assert any(name in rows[0] for name in DIST_NAMES), rows[0]

    helped = installed.run("-m", "rlhf_pl", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "labeler: brevity, human, rule" in helped.stdout


BUILD = """
import json
from rlhf_pl import registry
from rlhf_pl.data.formats import Message, Prompt
from rlhf_pl.plugins.labelers import make_task, rank_all, ranking_to_json
labeler = registry.build_by_name("labelers", "brevity", max_words=3)
prompt = Prompt((Message("user", "What is 2 + 2?"),), "test:1", {})
completions = ["It is four.", "4.", "", "Two and two make four.", "Four!", "The answer is 4."]
(ranking,) = rank_all(labeler, [make_task(prompt, completions)])
print(json.dumps({"type": type(labeler).__module__ + "." + type(labeler).__name__, "completions": completions,
                  "ranking": ranking_to_json(ranking), "scores": [labeler.score(prompt, c) for c in completions]}))
"""


def test_built_from_the_registry_it_ranks_by_brevity(installed, tmp_path):
    proc = installed.run("-c", BUILD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["type"] == "rlhf_pl_brevity_labeler.labeler.BrevityLabeler"
    # one-word answers tie first; "It is four." (3 words, the limit) next; empty and over-long ones last, tied
    assert result["ranking"] == [[1, 4], 0, [2, 3, 5]] == brevity_ranking(result["completions"], 3)
    assert result["scores"] == [-3.0, -1.0, -4.0, -4.0, -1.0, -4.0]


def test_composes_and_a_bad_value_is_one_clear_line(installed, tmp_path):
    proc = installed.run("-m", "rlhf_pl", "+stage=collect", "labeler=brevity", "labeler.max_words=20", "--cfg", "job",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.to_container(OmegaConf.create(proc.stdout).labeler) == {"max_words": 20}

    bad = installed.run("-m", "rlhf_pl", "+stage=collect", "experiment=quick", "labeler=brevity",
                        "labeler.max_words=0", f"paths.output_root={tmp_path / 'out'}", cwd=tmp_path)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert errors == ["error: labeler.max_words=0: must be an integer >= 1"], bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr


def test_collect_writes_brevity_rankings_end_to_end(installed, tmp_path):
    out, max_words = tmp_path / "out", 4
    proc = installed.run("-m", "rlhf_pl", "+stage=collect", "experiment=quick", "labeler=brevity",
                         f"labeler.max_words={max_words}", "collect.policy_from=base", "data.limit=16",
                         "collect.max_new_tokens=16", f"paths.output_root={out}", "trainer.enable_progress_bar=false",
                         cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((out / "runs").iterdir())
    records = [json.loads(line) for line in (run_dir / "comparisons.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert records and summary["labeler"] == "brevity"
    assert len(records) + summary["all_tie"] + summary["fewer_than_2_distinct"] == summary["prompts"] == 16
    for record in records:
        assert record["ranking"] == brevity_ranking(record["completions"], max_words), record
        assert record["provenance"]["labeler"] == "brevity" and record["provenance"]["policy"] == "tiny"
