"""Measuring the repair: Table 1 (evaluate.py), the worst case per image (worst_case.py, worst_case_table.py), the
repairs an evaluation names (repair_spec.py), Wilson intervals and exact McNemar tests (stats.py), attacked image sets
(attack_set.py), the resumable chunks of work (stage_cache.py), their progress (progress.py) and their tasks on Ray
(on_ray.py)."""
