"""The strategy factory and the global-batch check."""
import pytest
import tensorflow as tf

from harl_tf import distribute


def test_named_strategies_and_their_replicas():
    assert distribute.make_strategy("default") is tf.distribute.get_strategy()
    one = distribute.make_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy) and one.num_replicas_in_sync == 1
    mirrored = distribute.make_strategy("mirrored")   # all logical CPUs (conftest: 2)
    assert distribute.num_replicas(mirrored) == 2
    assert distribute.is_chief(mirrored) and not distribute.uses_custom_loop(mirrored)


def test_bad_names_and_missing_tf_config_are_explained(monkeypatch):
    with pytest.raises(ValueError, match=r"--strategy must be one of .*got 'mirorred'"):
        distribute.make_strategy("mirorred")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.describe_tf_config()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="'cluster' and 'task'"):
        distribute.describe_tf_config()


def test_global_batch_must_split_over_replicas():
    assert distribute.check_global_batch(8, 2) == 4
    assert distribute.check_global_batch(4096, distribute.make_strategy("default")) == 4096
    with pytest.raises(ValueError) as e:
        distribute.check_global_batch(10, 4, flag="batch_size")
    message = str(e.value)
    assert "--batch_size=10" in message and "4 replicas" in message and "\n" not in message
    with pytest.raises(ValueError, match="--batch_size must be positive"):
        distribute.check_global_batch(0, 2)
