"""mixrobust's test suite (a regular package: robustbench's wheel installs a top-level ``tests`` package that would
shadow a namespace package of this name)."""
