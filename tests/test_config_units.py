"""Unit tests of config helpers (no processes)."""
from parallelkit.config.compose import check_group_choices
from parallelkit.config.env import adopt_slurm_env, first_host


def test_first_host_of_slurm_nodelists():
    assert first_host("gpu[003-005,010],cpu01") == "gpu003"
    assert first_host("node7") == "node7"
    assert first_host("a1,a2") == "a1"
    assert first_host("n[12,14]") == "n12"


def test_slurm_env_becomes_torch_env():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "4242"}
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    assert env["MASTER_ADDR"] == "gpu001" and env["MASTER_PORT"] == "24242"
    assert not adopt_slurm_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})  # one task: our own launcher runs
    assert not adopt_slurm_env({"RANK": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"})  # torchrun already did


def test_group_choice_check():
    assert check_group_choices(["strategy=ddp", "model=tiny", "train.steps=3"]) is None
    assert "choose one of" in check_group_choices(["model=huge"])
    assert check_group_choices(["strategy=glob(*)"]) is None
    assert "strategy=bogus" in check_group_choices(["strategy=ddp,bogus"])
