# mailward: `make demo` shows it working, `make test` runs every test (what CI runs).
PYTHON ?= python3
VENV ?= .venv
# Building pymilter needs libmilter's headers and a compiler; the venv needs python3-venv.
DEB_BUILD = python3 python3-venv python3-dev gcc libc6-dev libmilter-dev
# The lab (demo, integration tests) runs a private Postfix with a certificate from openssl.
DEB_LAB = postfix openssl
# Only the tests: a private redis-server and a private PostgreSQL cluster on loopback (rate
# limits and the report store shared by a fleet), chromium (the report page in a real browser),
# systemd-analyze to check the unit file, promtool (in prometheus) to check the alerts, and
# what the private Sendmail needs (lab/sendmail.py fetches Sendmail itself, unpacked, as
# sendmail-bin conflicts with postfix).
DEB_TEST = redis-server systemd prometheus m4 libwrap0 postgresql chromium groff-base

.PHONY: demo test lint deps test-deps venv clean fuzz bench-memory soak bench docs deb test-deb

# The Debian package (make deb): Debian's own tooling, run on Debian 12.
DEB_PACKAGE = debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-pip python3-build python3-installer python3-wheel lintian fakeroot git

deps:
	sh packaging/debian-deps.sh $(DEB_BUILD) $(DEB_LAB)

test-deps:
	sh packaging/debian-deps.sh $(DEB_BUILD) $(DEB_LAB) $(DEB_TEST)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: deps
	$(MAKE) venv
	$(VENV)/bin/mailward demo

lint: venv
	$(VENV)/bin/ruff check milter tests bench
	$(VENV)/bin/mypy

test: test-deps
	$(MAKE) venv
	$(MAKE) lint
	$(VENV)/bin/python -m pytest --ignore=tests/deb $(PYTEST_ARGS)
	$(MAKE) test-deb

# The whole suite once more, on Debian's own python3 against what the .deb installs (apt-get
# install on this machine), plus tests/deb on the installation itself. This run's milters use
# the libmilter engine ([milter] engine), the first run's the default, asyncio: each engine
# passes every test that starts a milter.
DEB_PYTEST = python3-pytest python3-hypothesis python3-yaml python3-redis python3-psycopg \
	python3-lxml
test-deb: deb
	sh packaging/debian-deps.sh $(DEB_PYTEST)
	PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --reinstall ./build/mailward_$(VERSION)_all.deb >/dev/null
	PATH=/usr/sbin:/usr/bin:/sbin:/bin MAILWARD_TEST_ENGINE=libmilter \
		/usr/bin/python3 -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# Run by hand: the property tests with 20,000 examples each and a 50 ms bound per input, and
# the hostile-header chain and parser tests with their absolute bound (issues 7 and 10).
# Minutes, not seconds.
fuzz: test-deps
	$(MAKE) venv
	MAILWARD_FUZZ=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_properties.py \
		tests/core/test_hostile_headers.py tests/core/test_addresses.py tests/core/test_bodyhash.py \
		tests/core/test_authresults.py

# Run by hand: 20,000 messages of five kinds at 50 sessions through the lab Postfix, each
# accounted for exactly once (the suite runs 2,000). About 3 minutes.
soak: test-deps
	$(MAKE) venv
	MAILWARD_SOAK=20000 $(VENV)/bin/python -m pytest -q -s -p no:cacheprovider \
		tests/integration/test_soak.py

# Run by hand: peak RSS of the milter with 100 sessions of 20 MB DKIM mail in flight (issue 7).
bench-memory: deps
	$(MAKE) venv
	$(VENV)/bin/python bench/memory.py -c 100 --mb 20

# Run by hand: mailward against OpenDKIM + OpenDMARC, a null pymilter milter and no milter,
# through private Postfix instances with smtp-source and smtp-sink (issue 9). bench/README.md
# says what is measured. It installs the .deb on this machine (variant mw-deb runs mailward
# on Debian's python3 and libraries). About 5 minutes; BENCH_ARGS=--quick for a smoke run.
DEB_BENCH = opendkim opendkim-tools opendmarc postfix iproute2
bench: deps deb
	sh packaging/debian-deps.sh $(DEB_BENCH)
	PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --reinstall ./build/mailward_$(VERSION)_all.deb >/dev/null
	$(MAKE) venv
	$(VENV)/bin/python bench/peers.py $(BENCH_ARGS)

# The configuration and metrics references, generated from the code (tests/test_reference.py
# fails when the committed files differ from what this writes).
docs: venv
	$(VENV)/bin/mailward docs config > docs/configuration.md
	$(VENV)/bin/mailward docs metrics > docs/metrics.md
	$(VENV)/bin/mailward docs man > docs/mailward.8

clean:
	rm -rf $(VENV) build *.egg-info milter/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# build/mailward_<version>_all.deb, from the files git knows (committed or not), with the
# bundled libraries of packaging/debian/vendor.txt fetched as wheels.
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' milter/mailward/__init__.py)
deb:
	sh packaging/debian-deps.sh $(DEB_PACKAGE)
	rm -rf build/deb && mkdir -p build/deb/src
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C build/deb/src
	cp -r packaging/debian build/deb/src/debian
	$(PYTHON) -m pip wheel --quiet --no-deps -w build/deb/src/debian/vendor \
		-r packaging/debian/vendor.txt
	cd build/deb/src && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign
	cp build/deb/mailward_$(VERSION)_all.deb build/
	lintian --fail-on error build/mailward_$(VERSION)_all.deb
