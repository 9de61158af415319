"""The address-refresh filter: lifetime refreshes are no news, flag changes and removals are."""

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from mape_daemon.kernel.watch import AddressRefreshFilter


def addr(event: str, address: str, flags: int = 0, preferred: int = 3600) -> ifaddrmsg:
    msg = ifaddrmsg()
    msg["index"], msg["prefixlen"], msg["flags"] = 2, 64, 0
    cache = {"ifa_preferred": preferred, "ifa_valid": 7200, "cstamp": 0, "tstamp": 0}
    msg["attrs"] = [("IFA_ADDRESS", address), ("IFA_FLAGS", flags), ("IFA_CACHEINFO", cache)]
    msg["event"] = event
    return msg


def test_refreshes_are_dropped_changes_pass():
    f = AddressRefreshFilter()
    a = "2400:4050:1234:5600::1"
    assert f.is_news(addr("RTM_NEWADDR", a, flags=0x40))  # new, tentative
    assert f.is_news(addr("RTM_NEWADDR", a))  # DAD done
    assert not f.is_news(addr("RTM_NEWADDR", a, preferred=3000))  # an RA refreshed the lifetimes
    assert f.is_news(addr("RTM_NEWADDR", a, preferred=0))  # deprecated by renumbering
    assert not f.is_news(addr("RTM_NEWADDR", a, preferred=0))
    assert f.is_news(addr("RTM_DELADDR", a, preferred=0))
    assert f.is_news(addr("RTM_NEWADDR", a))  # back again


def test_other_events_always_pass():
    f = AddressRefreshFilter()
    msg = addr("RTM_NEWADDR", "2400::1")
    msg["event"] = "RTM_NEWLINK"
    assert f.is_news(msg) and f.is_news(msg)
