"""`postcall doctor`: checks the deployment end to end, one line per check (checks.py pure, probes.py the I/O)."""
