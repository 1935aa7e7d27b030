"""scripts/mutation_check.py: its list applies to the tree, and it restores what it mutates."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mutation_check as mc  # noqa: E402


def test_every_listed_mutation_applies_to_the_current_code():
    """Fails when a refactor moves a mutated line: update the list in scripts/mutation_check.py."""
    mc.check_mutations(mc.MUTATIONS, mc.ROOT)
    assert len(mc.MUTATIONS) >= 15
    covered = {m.path for m in mc.MUTATIONS}
    assert {"moetrain/model/transformer.py", "moetrain/model/moe/losses.py",
            "moetrain/model/moe/router.py", "moetrain/model/moe/dispatcher.py",
            "moetrain/trainer.py", "moetrain/checkpoint/manager.py"} <= covered
    for m in mc.MUTATIONS:
        for test in m.tests:
            assert (mc.ROOT / test.split("::")[0]).exists(), (m.name, test)


def _scratch_repo(root: Path) -> None:
    (root / "calc.py").write_text("def add(a, b):\n    return a + b\n\n\n"
                                  "def double(x):\n    return x * 2\n")
    (root / "test_calc.py").write_text("from calc import add\n\n\n"
                                       "def test_add():\n    assert add(2, 3) == 5\n")
    for cmd in (["init", "-q"], ["add", "."],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)


def test_mutations_are_reported_and_every_file_restored(tmp_path):
    _scratch_repo(tmp_path)
    before = (tmp_path / "calc.py").read_bytes()
    caught = mc.Mutation("add-subtracts", "calc.py", "return a + b", "return a - b",
                         ("test_calc.py",), "add subtracts")
    survived = mc.Mutation("double-triples", "calc.py", "return x * 2", "return x * 3",
                           ("test_calc.py",), "double triples (untested)")
    hangs = mc.Mutation("add-hangs", "calc.py", "return a + b",
                        "__import__('time').sleep(600)", ("test_calc.py",), "add hangs")
    outcomes = mc.run([caught, survived], tmp_path, timeout=120, python=sys.executable,
                      log=lambda *_: None)
    assert [(o.status, o.test) for o in outcomes] == [
        ("caught", "test_calc.py::test_add"), ("survived", "")]
    assert (tmp_path / "calc.py").read_bytes() == before
    # A hanging test is killed at the time limit; the file is restored all the same.
    [timed_out] = mc.run([hangs], tmp_path, timeout=10, python=sys.executable, baseline=False,
                         log=lambda *_: None)
    assert timed_out.status == "timeout" and (tmp_path / "calc.py").read_bytes() == before
    table = mc.report(outcomes, "header")
    assert "| `add-subtracts` | `calc.py` | add subtracts | `test_calc.py::test_add` |" in table
    assert "**SURVIVED**" in table and "1 of 2 mutations caught." in table


def test_a_dirty_file_or_a_stale_mutation_is_refused_before_anything_changes(tmp_path):
    _scratch_repo(tmp_path)
    edited = "def add(a, b):\n    return b + a  # local edit\n"
    (tmp_path / "calc.py").write_text(edited)
    stale = mc.Mutation("add-subtracts", "calc.py", "return a + b", "return a - b",
                        ("test_calc.py",), "")
    with pytest.raises(mc.UserError, match="occurs 0 times in calc.py"):
        mc.run([stale], tmp_path, timeout=60, python=sys.executable)
    other = mc.Mutation("swap", "calc.py", "return b + a", "return a - b", ("test_calc.py",), "")
    with pytest.raises(mc.UserError, match="uncommitted changes in calc.py"):
        mc.run([other], tmp_path, timeout=60, python=sys.executable)
    assert (tmp_path / "calc.py").read_text() == edited


def test_the_report_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "testing.md"
    doc.write_text(f"intro\n{mc.BEGIN}\nold table\n{mc.END}\nafter\n")
    mc.write_report(doc, "new table")
    assert doc.read_text() == f"intro\n{mc.BEGIN}\nnew table\n{mc.END}\nafter\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(mc.UserError, match="needs one"):
        mc.write_report(tmp_path / "plain.md", "x")
    assert mc.main(["--only", "no-such-mutation"]) == 2


def test_every_config_key_is_classified_for_the_key_coverage_sweep():
    """A branch that adds config keys fails here, one line naming the key, until it puts the
    key in MATH_KEYS (with a mutation bending it) or NOT_MATH in scripts/mutation_check.py."""
    for key in mc.schema_keys():
        try:
            mc.classify(key)
        except mc.UnclassifiedKey as err:
            pytest.fail(str(err), pytrace=False)
    mc.check_classification()  # MATH_KEYS and every mutation's keys are schema keys


def test_an_unknown_key_is_refused_in_one_line_naming_it(monkeypatch, capsys):
    with pytest.raises(mc.UnclassifiedKey) as err:
        mc.classify("model.mtp.num_layers")
    assert "model.mtp.num_layers" in str(err.value) and "\n" not in str(err.value)
    keys = mc.schema_keys()
    monkeypatch.setattr(mc, "schema_keys", lambda: [*keys, "model.moe.unclassified_knob"])
    assert mc.main(["--keys"]) == 2
    assert capsys.readouterr().err == (
        "error: config key model.moe.unclassified_knob is not classified for the key-coverage "
        "sweep: add it to MATH_KEYS with a mutation that bends it (keys=...) or to NOT_MATH with "
        "the reason, in scripts/mutation_check.py\n")


def test_a_key_without_a_caught_mutation_is_a_failing_line(tmp_path):
    bend = mc.Mutation("lr-ignored", "moetrain/optim.py", "a", "b", ("tests/test_optim.py",),
                       "lr ignored", keys=("optim.lr",))
    caught = {"lr-ignored": {"status": "caught", "test": "tests/test_optim.py::t", "seconds": 1,
                             "digest": bend.digest, "date": "2026-12-07"}}
    text, failing = mc.key_report([bend], caught)
    assert "| `optim.lr` | `lr-ignored`: lr ignored | `tests/test_optim.py::t` |" in text
    assert "optim.lr" not in failing and "optim.decay" in failing
    assert "| `optim.decay` | **UNCOVERED: no mutation bends it** | **FAIL** |" in text
    # A survivor, a run of an older text, or no run at all covers nothing.
    for record in ({**caught["lr-ignored"], "status": "survived"},
                   {**caught["lr-ignored"], "digest": "0" * 12}, None):
        _, failing = mc.key_report([bend], {} if record is None else {"lr-ignored": record})
        assert "optim.lr" in failing
    # Records merge: a run of one mutation keeps the others'.
    path = tmp_path / "results.json"
    other = mc.Mutation("other", "x.py", "a", "b", ("t.py",), "")
    mc.record_results([mc.Outcome(bend, "caught", "t::a", 1.0)], {"date": "d"}, path)
    mc.record_results([mc.Outcome(other, "survived", "", 2.0)], {"date": "d"}, path)
    assert set(mc.load_results(path)) == {"lr-ignored", "other"}


def test_the_docs_key_coverage_block_is_generated_from_the_list_and_the_record():
    """docs/testing.md's table cannot drift: re-run `mutation_check.py --report docs/testing.md`."""
    text, _ = mc.coverage_text()
    assert mc.marked_block(mc.ROOT / "docs" / "testing.md") == text
