"""Helpers shared by the benchmarks, one module per concern, all reachable from here:

    from bench import common
    result = {"machine": common.machine_info(), ...}
    common.write_result("bench_x", result)     # bench/results/bench_x.json, atomically
    seconds = common.run([sys.executable, "-m", "harl_tf.pretrain", ...], "pretrain.log")

- :mod:`bench.common.machine`: the machine's description (``machine_info``);
- :mod:`bench.common.results`: ``ROOT``, ``RESULTS_DIR``, results files and tables;
- :mod:`bench.common.processes`: the subprocess runner (``run``), peak memory of a
  process tree (``PeakRss``), the soak's access to the tests' helpers;
- :mod:`bench.common.data`: synthetic records, JPEG bytes, SimCLR's data_util, a
  labelled image folder;
- :mod:`bench.common.splits`: train splits whose parts share no object (cutouts).

The benchmarks run from the repository root as modules (``python -m bench.<name>``), so
``bench`` and ``harl_tf`` import without any path set-up. Nothing here imports TensorFlow
at module level (``machine_info`` reads installed versions from package metadata), so a
parent process that only starts children stays small.
"""
from bench.common.data import (ensure_synthetic_records, jpeg_bytes,  # noqa: F401
                               load_simclr_data_util, read_labelled_split,
                               write_example_records)
from bench.common.machine import (cpu_flags, cpu_model, describe_machine,  # noqa: F401
                                  load_average, machine_info, versions)
from bench.common.processes import PeakRss, import_test_helpers, run  # noqa: F401
from bench.common.results import (RESULTS_DIR, ROOT, background_fields,  # noqa: F401
                                  chosen_configs, command_line, format_summary,
                                  median, summarise, table, write_json_atomic,
                                  write_result)
