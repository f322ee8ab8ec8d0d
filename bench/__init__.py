"""`python -m bench` from a checkout (not installed): the benchmark lives in warmturn/bench/."""
