#!/bin/sh
# PID 1 inside the lab VM, on the throw-away overlay root. Mounts what a system needs, then runs
# the run folder's cmd.sh (plain mode) or boots systemd with it as a unit (systemd mode), and
# writes its exit status back to the run folder before powering off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root MAPE_LAB_INSIDE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# /tmp stays on the overlay (already throw-away): a tmpfs there would hide a project checked out under /tmp.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
run=$(sed -n 's/.*mape.run=\([^ ]*\).*/\1/p' /proc/cmdline)
mode=$(cat "$run/mode")
hostname mape-lab
ip link set lo up
poweroff_now() { sync; busybox poweroff -f 2>/dev/null || echo o > /proc/sysrq-trigger; sleep 10 2>/dev/null; }

case "$mode" in
plain)
  sh "$run/cmd.sh" </dev/null >/dev/console 2>&1
  echo $? > "$run/status"
  poweroff_now
  ;;
shell)
  echo "lab: shell in the VM; 'exit' powers off"
  setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'
  poweroff_now
  ;;
systemd)
  # Two traps (see the README's lab section): /.dockerenv makes systemd think it is in a
  # container, and tmp.conf would make systemd-tmpfiles wipe /tmp at boot.
  rm -f /.dockerenv
  ln -sf /dev/null /etc/tmpfiles.d/tmp.conf
  # The host's network managers stay off unless a test starts them (systemctl unmask/start).
  for u in apparmor.service systemd-udev-trigger.service systemd-timesyncd.service timers.target \
           getty.target serial-getty@ttyS0.service postgresql.service cron.service \
           NetworkManager.service NetworkManager-wait-online.service firewalld.service \
           systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service \
           wpa_supplicant.service ModemManager.service; do
    ln -sf /dev/null "/etc/systemd/system/$u"
  done
  cat > /etc/systemd/system/mape-lab-test.service <<UNIT
[Unit]
Description=mape-daemon lab test
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
Environment=PATH=$PATH HOME=/root MAPE_LAB_INSIDE=1 MAPE_LAB_SYSTEMD=1
ExecStart=/bin/sh -c 'sh $run/cmd.sh </dev/null >/dev/ttyS0 2>&1; echo \$? > $run/status'
UNIT
  cat > /etc/systemd/system/mape-lab.target <<UNIT
[Unit]
Description=mape-daemon lab
Requires=basic.target mape-lab-test.service
After=basic.target
UNIT
  exec /lib/systemd/systemd --unit=mape-lab.target --log-level=warning
  ;;
esac
