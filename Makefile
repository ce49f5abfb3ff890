# The two entry points of the README. Each installs missing Debian packages, configures and builds.
BUILD ?= build
JOBS ?= $(shell nproc)
DEMO_DIR ?= $(BUILD)/demo-model
MODEL ?= $(DEMO_DIR)

.PHONY: all build deps demo test clean format lint

all: build

deps:
	@tools/install-deps.sh

$(BUILD)/build.ninja: | deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	@tools/demo.sh $(BUILD) $(DEMO_DIR) "$(MODEL)"

test: build
	@tools/install-js-deps.sh
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD)

format:
	git ls-files '*.h' '*.cc' '*.cu' '*.cuh' | xargs clang-format -i

# Every translation unit, and the project's headers they include (not the system's).
LINT_HEADERS = ^$(CURDIR)/(cli|collectives|common|coordinator|cpu|cuda|engine|kernels|launcher|model|rpc|serving|tests|tools|worker)/
lint: build
	git ls-files '*.cc' | xargs clang-tidy -p $(BUILD) --quiet --header-filter='$(LINT_HEADERS)'
