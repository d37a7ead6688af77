"""The command-line programs (the apps room). The library below holds no argparse and computes
no repository paths; these programs parse arguments and pass files in.

========================================  ====================================================
``python -m model.cli.evaluate``          evaluate or fine-tune any checkpoint on a protocol
``python -m model.cli.export``            slim release checkpoint from a training checkpoint
``python -m model.cli.gallery``           Grad-CAM / soft-mask gallery of a trained run
``python -m model.cli.prepare <source>``  dataset converters, tar shards
``python -m model.cli.preflight``         check caption files and images before training
``python -m model.cli.synthetic``         write the generated synthetic set
========================================  ====================================================
"""
