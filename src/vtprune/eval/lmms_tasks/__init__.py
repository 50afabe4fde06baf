"""lmms-eval task files for vtprune's offline benchmarks.

``vtprune_scenes.yaml`` is the task definition of the shipped scenes benchmark; it is copied, next
to the exported data, into the folder that ``vtprune.eval.export_scenes`` writes, and that folder is
what lmms-eval's ``--include_path`` points at. ``scenes_utils`` holds the functions the YAML names.
"""
