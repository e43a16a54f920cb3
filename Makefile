# The two commands of the README: `make run` and `make test`.
.PHONY: setup run test

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/dspark-node run

test:
	@EXTRAS=test bash scripts/setup.sh
	@bash scripts/test-deps.sh
	.venv/bin/pytest
