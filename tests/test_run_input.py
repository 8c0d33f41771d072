"""The `arrl` commands given what they cannot use: refused with what is wrong, not a traceback;
`arrl run` before anything starts.

And a stage that keeps exiting once everything has started ends `arrl run` with a failure status,
not a zero one, so that a script driving it can tell.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import anyio
import pytest
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401

from arrl.campaign import CampaignConfig
from arrl.cli import main as arrl_main
from arrl.edits import parse_tunables, search_space
from arrl.policy import Policy, to_bytes
from pipeline.launcher import LocalCampaign, run_local
from pipeline.procs import processes_mentioning


def refused(capsys: pytest.CaptureFixture[str], run_dir: Path, *options: str) -> str:
    """`arrl run OPTIONS` exits 2 before creating `run_dir`; returns what it said."""
    with pytest.raises(SystemExit) as stop:
        arrl_main(["run", "--profile", "smoke", "--max-experiments", "2", "--run-dir", str(run_dir),
                   "--target", str(TRAIN_PY), *options])
    assert stop.value.code == 2
    assert not run_dir.exists()  # nothing was started
    return capsys.readouterr().err


def test_a_checkpoint_that_cannot_start_the_policy_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prepared_data,  # noqa: F811
) -> None:
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint\n")
    said = refused(capsys, tmp_path / "run", "--checkpoint", str(garbage))
    assert f"--checkpoint {garbage} cannot be read as policy weights" in said

    said = refused(capsys, tmp_path / "run", "--checkpoint", str(tmp_path / "missing.pt"))
    assert "missing.pt: No such file or directory" in said

    # Weights trained for other tunables: a narrower domain of one of train.py's.
    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    name = next(n for n, d in space.items() if d["kind"] == "log")
    other = tmp_path / "other-space.pt"
    other.write_bytes(to_bytes(Policy({**space, name: {**space[name], "high": space[name]["high"] / 2}}, seed=0)))
    said = refused(capsys, tmp_path / "run", "--checkpoint", str(other))
    assert "trained for another search space" in said and name in said


def test_a_malformed_selfeval_option_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prepared_data,  # noqa: F811
) -> None:
    # Accepted before, it failed the self-evaluator's every tick, so no run was ever aborted.
    said = refused(capsys, tmp_path / "run", "--selfeval-option", "alpha=abc")
    assert "--selfeval-option: alpha must be a number >= 0, not 'abc'" in said
    said = refused(capsys, tmp_path / "run", "--selfeval-option", "stop_unscored_class=2")
    assert "stop_unscored_class must be 0 or 1, not 2" in said
    said = refused(capsys, tmp_path / "run", "--selfeval-option", "alhpa=0.5")
    assert "unknown self-evaluator option(s): alhpa (known: alpha," in said


@pytest.mark.parametrize(("options", "says"), [
    (["--profile", "nosuch"], "argument --profile: invalid choice: 'nosuch'"),
    (["--max-experiments", "-1"], "argument --max-experiments: must be at least 0, got -1"),
    (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["--budget-s", "-5"], "argument --budget-s: must be at least 0, got -5"),
    (["--queue-depth", "-1"], "argument --queue-depth: must be at least 0, got -1"),
    (["--noise-sigma", "0"], "argument --noise-sigma: must be more than 0, got 0"),
    (["--max-wall-s", "nan"], "argument --max-wall-s: must be at least 0, got nan"),
    (["--patience", "ten"], "argument --patience: not a whole number: 'ten'"),
    (["--strategy", "bayes"], "--strategy 'bayes': choose one of random, ppo"),
    (["--executor", "sim", "--landscape", "arrl.landscapes:cpu_fitted", "--strategy", "bayes"], "--strategy 'bayes'"),
])
def test_an_option_out_of_its_range_is_refused_up_front(
    options: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], prepared_data,  # noqa: F811
) -> None:
    # Before, a negative count started a campaign that stopped at once, or never started a worker.
    assert says in refused(capsys, tmp_path / "run", *options)


def test_a_target_that_cannot_start_a_campaign_and_an_unreachable_redis_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prepared_data,  # noqa: F811
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(TRAIN_PY.read_text().replace("def ", "def (", 1))
    said = refused(capsys, tmp_path / "run", "--target", str(broken))
    assert f"{broken} cannot start a campaign: syntax_error" in said
    untuned = tmp_path / "untuned.py"
    untuned.write_text(TRAIN_PY.read_text().replace("# search:", "# was:"))
    said = refused(capsys, tmp_path / "run", "--target", str(untuned))
    assert f"{untuned} cannot start a campaign: the hyperparameter block holds no tunables" in said
    said = refused(capsys, tmp_path / "run", "--redis-url", "redis://127.0.0.1:1/0")
    assert "no Redis answers at redis://127.0.0.1:1/0" in said


def test_a_stage_that_keeps_exiting_ends_the_campaign_as_a_failure(tmp_path: Path, prepared_data) -> None:  # noqa: F811
    """The applier exits at once every time it is started: `arrl run` starts the proposer anyway
    (it waits for ready stages, not for ones that died), gives up after its restarts, and says which
    stage it gave up on, which `arrl run` turns into exit status 1."""

    class BrokenApplier(LocalCampaign):
        def stage_commands(self, url: str, config: CampaignConfig) -> dict[str, list[str]]:
            stages = super().stage_commands(url, config)
            stages["applier"] = [sys.executable, "-c", "raise SystemExit(3)"]
            return stages

    out = io.StringIO()
    local = BrokenApplier(tmp_path / "run", workers=1, out=out)
    config = CampaignConfig(profile="smoke", max_experiments=2, selfeval=False, strategy="random")

    async def supervise() -> dict:
        with anyio.fail_after(120):
            return await run_local(local, config, TRAIN_PY, interval_s=0.2)

    final = anyio.run(supervise)
    assert final["stages_exiting"] == ["applier"], out.getvalue()[-2000:]
    assert "stage(s) keep exiting: applier" in out.getvalue()
    assert "proposer" in local.processes  # not held back by a stage that never got ready
    assert final["recorded"] == 0  # no proposal reached the queue without an applier


def test_resuming_a_campaign_whose_redis_data_is_gone_says_so_and_leaves_nothing_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prepared_data,  # noqa: F811
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "campaign.json").write_text('{"campaign_id": "c-gone", "profile": "smoke"}')
    assert arrl_main(["run", "--resume", str(run_dir)]) == 2
    said = capsys.readouterr().err
    assert "campaign c-gone cannot be resumed: its Redis data (redis/ in the run directory) is gone" in said
    assert processes_mentioning(str(run_dir)) == []  # the private redis-server it started is stopped


def test_the_commands_that_read_a_campaign_say_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server,
) -> None:
    not_a_run = tmp_path / "not-a-run"
    for command in (["status", str(not_a_run)], ["tail", "e00001", "--run-dir", str(not_a_run)]):
        with pytest.raises(SystemExit) as stop:
            arrl_main(command)
        assert stop.value.code == 2 and f"{not_a_run} is not a run directory (no campaign.json)" in capsys.readouterr().err
    gone = "redis://127.0.0.1:1/0"
    for command in (["status", "--redis-url", gone], ["abort", "e00001", "--redis-url", gone]):
        assert arrl_main(command) == 1
        assert f"no Redis answers at {gone}" in capsys.readouterr().err
    # A finished campaign's run directory (its Redis gone) without the experiment asked for.
    finished = tmp_path / "finished"
    (finished / "logs").mkdir(parents=True)
    (finished / "campaign.json").write_text(f'{{"campaign_id": "c1", "redis_url": "{gone}"}}')
    assert arrl_main(["tail", "e00042", "--run-dir", str(finished)]) == 1
    assert f"e00042 has no log in {finished / 'logs'} and the campaign's Redis ({gone}) does not answer" in \
        capsys.readouterr().err
    # A Redis that answers but holds no campaign.
    with pytest.raises(SystemExit, match="no campaign in"):
        arrl_main(["status", "--redis-url", redis_server.url])
    with pytest.raises(SystemExit, match="no campaign 'c-none' in"):  # what every stage says too
        arrl_main(["status", "--redis-url", redis_server.url, "--campaign", "c-none"])
    with pytest.raises(SystemExit) as stop:
        arrl_main(["bench", "selfeval", "--curves", str(tmp_path / "none.jsonl")])
    assert stop.value.code == 2 and "no curves file at" in capsys.readouterr().err


def test_pretrain_and_init_refuse_what_they_cannot_use_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "policy.pt"
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint\n")
    edit_policy = tmp_path / "edit.pt"
    edit_policy.write_bytes(to_bytes(Policy(search_space(parse_tunables(TRAIN_PY.read_text())))))
    for options, says in ((["--landscape", "nosuch:make"], "pretrain: cannot import landscape module 'nosuch'"),
                          (["--landscape", "arrl.landscapes:cpu_fitted", "--campaigns", "0"],
                           "argument --campaigns: must be at least 1, got 0"),
                          (["--landscape", "arrl.landscapes:cpu_fitted", "--experiments", "25,1"],
                           "argument --experiments: must be at least 2, got 1"),
                          (["--landscape", "arrl.landscapes:cpu_fitted", "--checkpoint", str(garbage)],
                           "cannot be read as policy weights"),
                          (["--landscape", "arrl.landscapes:cpu_fitted", "--credit", "campaign", "--group", "1"],
                           "argument --group: must be at least 2, got 1"),
                          (["--landscape", "arrl.landscapes:cpu_fitted", "--credit", "campaign", "--checkpoint",
                            str(edit_policy)], "--credit campaign trains the ppo strategy's policy")):
        with pytest.raises(SystemExit) as stop:
            arrl_main(["pretrain", *options, "--out", str(out), "--target", str(TRAIN_PY)])
        assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as stop:
        arrl_main(["init", "--redis-url", "redis://127.0.0.1:1/0", "--target", str(TRAIN_PY)])
    assert stop.value.code == 2 and "init: no Redis answers at redis://127.0.0.1:1/0" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("x = (\n")
    with pytest.raises(SystemExit) as stop:  # the target first: the checkpoint's check reads its tunables
        arrl_main(["init", "--redis-url", "redis://127.0.0.1:1/0", "--target", str(broken), "--checkpoint", str(garbage)])
    assert stop.value.code == 2 and f"{broken} cannot start a campaign: syntax_error" in capsys.readouterr().err
