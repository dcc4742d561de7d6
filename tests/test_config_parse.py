"""config.parse_argv: a config from a command line of the binary's flags, nested flagfiles
included, without touching the process's flags."""
import pytest
from absl import flags

from harl_tf import config


def test_nested_flagfiles_and_later_flags_win(tmp_path):
    base = tmp_path / "base.cfg"
    base.write_text("# a comment\n--depth=18\n--batch_size=128\n--tau_base=0.99\n")
    method = tmp_path / "method.cfg"
    method.write_text(f"--flagfile={base}\n--loss_mode=byol\n--batch_size=64\n")
    before = flags.FLAGS["depth"].value if "depth" in flags.FLAGS else None
    c = config.parse_argv(config.PretrainConfig, [f"--flagfile={method}", "--tau_base=0.97"])
    assert c.model.encoder.depth == 18             # from the nested base
    assert c.batch_size == 64                      # the method file overrides the base
    assert c.model.loss_mode == "byol"
    assert c.model.tau_base == 0.97                # the command line overrides both
    assert c.optimizer.trust_coefficient == 1e-3   # not given anywhere: the SPEC default
    # The process's flags (harl_tf.pretrain's, if another test imported it) are untouched.
    assert (flags.FLAGS["depth"].value if "depth" in flags.FLAGS else None) == before


def test_unknown_or_bad_flag_is_a_config_error_naming_it():
    with pytest.raises(config.ConfigError, match="no_such_flag"):
        config.parse_argv(config.PretrainConfig, ["--no_such_flag=1"])
    with pytest.raises(config.ConfigError, match="loss_mode"):
        config.parse_argv(config.PretrainConfig, ["--loss_mode=bogus"])
