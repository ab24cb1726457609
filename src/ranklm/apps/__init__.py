"""The drivers above the pipeline: one module (or package) per job a user runs.

* ``compress`` — load a model, cut calibration and evaluation windows, run the pipeline, measure, save;
* ``bench`` — a grid of methods x keep ratios through the same pipeline, side by side;
* ``finetune`` — task fine-tuning of an encoder while compressing it.

The layering reads top to bottom: ``cli`` -> ``apps`` -> ``pipeline`` -> methods (decompose, allocate,
train, calibration) -> core (targets, budget, layers, checkpoint, loading). Nothing below imports
``apps``; the CLI modules only parse options and print what a driver returns.
"""
