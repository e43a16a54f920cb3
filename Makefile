# The two commands of the README: `make run` and `make test`.
.PHONY: setup run test

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/dspark-node run

test: setup
	@bash scripts/test-deps.sh
	.venv/bin/pytest
