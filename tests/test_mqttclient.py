"""Packets written without paho: their encoding, and the send buffer they share with paho's; the
agent on plain paho when the socket wrapper cannot be put in."""

import socket
import unittest

from support import BrokerTestCase, Mosquitto, envelope, new_task_id

from agent2389_lib.mqttclient import BufferedSocket, publish_packet_size, qos0_publish_packet


class Qos0PacketTests(unittest.TestCase):
    def test_encoding_by_protocol_version(self):
        # fixed header 0x30 (PUBLISH, QoS 0), remaining length, topic length and name, [properties], payload
        self.assertEqual(qos0_publish_packet("a/b", b"hi", v5=False), b"\x30\x07\x00\x03a/bhi")
        self.assertEqual(qos0_publish_packet("a/b", b"hi", v5=True), b"\x30\x08\x00\x03a/b\x00hi")

    def test_remaining_length_takes_more_bytes_as_it_grows(self):
        # the boundaries of MQTT's table (section 2.2.3); remaining length = 2 + 4 (topic "é/b") + payload
        for remaining, length_bytes in ((127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
                                        (16384, b"\x80\x80\x01"), (2097152, b"\x80\x80\x80\x01")):
            payload_size = remaining - 6
            with self.subTest(remaining):
                packet = qos0_publish_packet("é/b", b"x" * payload_size, v5=False)
                self.assertEqual(packet[1:1 + len(length_bytes)], length_bytes)
                self.assertEqual(len(packet), 1 + len(length_bytes) + 2 + 4 + payload_size)
                # the QoS 1 form carries a 2-byte packet id: as long as a QoS 0 one with 2 bytes more payload
                self.assertEqual(publish_packet_size("é/b", b"x" * payload_size, v5=False),
                                 len(qos0_publish_packet("é/b", b"x" * (payload_size + 2), v5=False)))


class SendBufferTests(unittest.TestCase):
    def setUp(self):
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.sock = BufferedSocket(ours, coalesce_writes=True)
        self.addCleanup(self.peer.close)
        self.addCleanup(self.sock.close)

    def received(self) -> bytes:
        self.peer.setblocking(False)
        data = b""
        try:
            while True:
                chunk = self.peer.recv(65536)
                if not chunk:
                    return data
                data += chunk
        except BlockingIOError:
            return data

    def test_nothing_is_written_before_the_session_is_open(self):
        self.assertFalse(self.sock.write_packet(b"early", 1024))
        self.sock.send(b"CONNECT")  # paho's own packets always go in
        self.sock.session_v5 = False
        self.assertTrue(self.sock.write_packet(b"+progress", 1024))
        self.sock.flush_writes()
        self.assertEqual(self.received(), b"CONNECT+progress")

    def test_a_peer_that_stops_reading_bounds_what_is_held(self):
        self.sock.session_v5 = True
        packet = b"p" * 1000
        for _ in range(100_000):  # 100 MB: far beyond what the kernel's buffers take
            if not self.sock.write_packet(packet, 64 * 1024):
                break
            self.sock.flush_writes()
        else:
            self.fail("write_packet never refused")
        self.assertLessEqual(self.sock.unsent(), 64 * 1024 + len(packet))
        self.assertEqual(self.sock.send(b"outcome"), 7, "paho's packets are never dropped")
        self.assertEqual(self.sock.unsent() % 1000, 7, "whole packets only, ours and paho's")


# what a paho release that renamed its private socket attributes looks like to the wrapper
RENAMED_PAHO_INTERNALS = ("import agent2389_lib.mqttclient as wire\n"
                          "wire.PAHO_SOCKET = wire.PAHO_SOCKET_CLOSE = '_renamed_by_a_later_paho'")


class PlainPahoTests(BrokerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(persistence=True).start()

    def test_without_the_wrapper_tasks_are_answered_on_plain_paho(self):
        agent_id = "plain-paho"
        watcher = self.watcher(f"/control/agents/{agent_id}/#", "/conversations/#")
        agent = self.agent(agent_id, prelude=RENAMED_PAHO_INTERNALS).start_and_wait_available(watcher)
        for cid in ("before-restart", "after-restart"):
            task_id = new_task_id()
            watcher.publish(f"/control/agents/{agent_id}/input", envelope(agent_id, task_id=task_id, cid=cid))
            (reply,) = watcher.wait_for(f"/conversations/{cid}/{agent_id}")
            self.assertEqual(reply["task_id"], task_id)
            # progress events are QoS 0 publishes: on plain paho they go through paho
            watcher.wait_for(f"/control/agents/{agent_id}/progress", lambda p: p["task_id"] == task_id)
            if cid == "before-restart":
                self.broker.stop()
                self.broker.start()
                watcher.wait_for(f"/control/agents/{agent_id}/status", lambda p: p["status"] == "available", count=2)
        self.assertEqual(agent.log().count("running on plain paho"), 1, "said once, for both links")
        self.assertNotIn("unexpected error", agent.log())
        self.assertEqual(agent.stop(), 0)


if __name__ == "__main__":
    unittest.main()
