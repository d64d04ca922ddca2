#!/usr/bin/env bash
# Install edgesparse on the NVIDIA Jetson Nano from a wheelhouse: devices/setup/jetson-nano.sh WHEELHOUSE [VENV]
exec "$(dirname "$0")/install.sh" jetson-nano "$@"
