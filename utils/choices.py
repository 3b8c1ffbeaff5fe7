"""The values of options that the parser and the code acting on them both need, defined once.

``utils/options/`` gives them to argparse (``choices=``), so a bad value fails at parse time naming the
option; ``data/transforms.py`` and ``data/image_check.py`` check their constructor arguments against the
same tuples, and ``data/loaders.py``'s ``loader_options`` maps each ``--pin_memory`` value. This module
imports nothing, so the option parser needs nothing from the data package (utils/ sits below data/).
"""

# --check_images: read the headers (default), only look for missing files, or check nothing
# (data/image_check.py).
CHECK_MODES = ("headers", "exist", "none")

# --augment: the training augmentation of data/transforms.py's build_transforms.
AUGMENTATIONS = ("ssd", "flip", "none")

# --crop_rule: RandomSampleCrop's min-IoU rule: any (Caffe SSD, ours) or all (the original codebase),
# see data/transforms.py.
CROP_RULES = ("any", "all")

# --pin_memory: auto (when the device is CUDA), on or off (data/loaders.py's loader_options).
PIN_MEMORY_MODES = ("auto", "on", "off")
