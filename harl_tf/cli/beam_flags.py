"""The --runner and --beam_pipeline_options flags of the data-preparation tools
(build_tfrecords, generate_masks): one definition for both."""
from absl import flags


def define(local_help: str) -> None:
    """Defines --runner (``local_help`` describes the local runner) and
    --beam_pipeline_options in the calling tool's process."""
    flags.DEFINE_enum("runner", "local", ["local", "beam"], f"local: {local_help}; beam: an "
                      "Apache Beam pipeline (extra [beam]) on the runner that "
                      "--beam_pipeline_options names.")
    flags.DEFINE_string("beam_pipeline_options", "", "Beam's own command-line options, "
                        "passed through, e.g. '--runner=DirectRunner --direct_num_workers=2 "
                        "--direct_running_mode=multi_processing' (empty: DirectRunner in "
                        "this process).")
