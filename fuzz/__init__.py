"""atheris fuzz harnesses (see docs/FUZZING.md). Importable so the tests can replay inputs."""
