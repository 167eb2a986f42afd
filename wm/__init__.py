"""Code that several scripts share: the environment and frame preprocessing,
rollout files, checkpoints, the command line, metrics and plots."""
