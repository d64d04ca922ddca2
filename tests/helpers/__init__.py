"""References and fixtures shared by several test files (pyproject: pytest `pythonpath`)."""
