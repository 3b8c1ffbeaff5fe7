"""The options every script shares: one parser, one resolution, one set of start-up checks.

Scripts build their parser as ``OptionParser(description=__doc__, parents=[get_common_parser()])`` and
add only what is theirs (OptionParser, in utils/cli.py, records which options were given, reads
``--config FILE`` and shows defaults in ``--help``). Groups: data, sampling, input, model, anchors, loss,
evaluation, schedule, logging, runtime and the original's options. Every script accepts every group,
so a training command line works unchanged with evaluate.py (which finds the run folder from it), as in
the original; demo.py and extract_features.py hide the training groups from ``--help``.

Then, in every script: ``resolve_defaults(args)`` (the one place where defaults that depend on other
options are decided) and ``check_common_args(args)`` (every bad value at once, by option name), before
anything is loaded. Builders read the resolved object and have no defaults of their own.

Option names follow the original codebase (``--basenet``, ``--shared_heads``, ``--anchor_type``,
``--loss_type``, ``--max_iter``, ``--step_values``, ``--val_step``, ``--man_seed``), and every option of
its four scripts parses: its other spellings are aliases (``--learning-rate``, ``--jaccard_threshold``,
``--num_nodes``), its booleans take ``=True/False/1/0`` (``BoolAction``) and ``--ngpu`` launches torchrun
(utils/launch.py). One spelling per concept: the first option string is the one ``--help`` shows.

Modules: parser.py (get_common_parser) with its groups in groups_model.py (data, sampling, input,
model, anchors, loss) and groups_run.py (evaluation, schedule, logging, runtime, the original's);
resolve.py (resolve_defaults, require_resolved); checks.py (check_common_args); run_names.py (run
folder names). What differs between architectures is in models/archs.py.
"""

from utils.options.checks import check_common_args, check_range_options, non_finite_options
from utils.options.groups_model import BASENETS, float_list, int_list, split_names
from utils.options.groups_run import ORIGINAL_PROTOCOL, OURS_PROTOCOL, PROTOCOLS, resume_option
from utils.options.parser import (
    TRAINING_GROUPS,
    TRAINING_OPTIONS,
    OptionParser,
    get_checkpoint_script_parser,
    get_common_parser,
)
from utils.options.resolve import (
    COMMON_SPLITS,
    ORIGINAL_SPLITS,
    amp_dtype_of,
    max_per_class_of,
    require_resolved,
    resolve_defaults,
    resolve_device,
    set_as_typed,
)
from utils.options.run_names import (
    RUN_NAME_EXTRAS,
    resume_checkpoint_path,
    run_folder,
    run_name,
    run_name_extras,
)

__all__ = [
    "BASENETS",
    "COMMON_SPLITS",
    "ORIGINAL_PROTOCOL",
    "ORIGINAL_SPLITS",
    "OURS_PROTOCOL",
    "PROTOCOLS",
    "RUN_NAME_EXTRAS",
    "TRAINING_GROUPS",
    "TRAINING_OPTIONS",
    "OptionParser",
    "get_checkpoint_script_parser",
    "amp_dtype_of",
    "check_common_args",
    "check_range_options",
    "float_list",
    "get_common_parser",
    "int_list",
    "max_per_class_of",
    "non_finite_options",
    "require_resolved",
    "resolve_defaults",
    "resolve_device",
    "resume_checkpoint_path",
    "resume_option",
    "run_folder",
    "run_name",
    "run_name_extras",
    "set_as_typed",
    "split_names",
]
