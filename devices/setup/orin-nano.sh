#!/usr/bin/env bash
# Install edgesparse on the NVIDIA Jetson Orin Nano from a wheelhouse: devices/setup/orin-nano.sh WHEELHOUSE [VENV]
exec "$(dirname "$0")/install.sh" orin-nano "$@"
