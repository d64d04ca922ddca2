#!/usr/bin/env bash
# Install edgesparse on the Raspberry Pi 5 from a wheelhouse: devices/setup/pi5.sh WHEELHOUSE [VENV]
exec "$(dirname "$0")/install.sh" pi5 "$@"
