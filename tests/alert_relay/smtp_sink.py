"""A real SMTP server (aiosmtpd) on 127.0.0.1 for tests/alert_relay.rs.

Each accepted message becomes one JSON file in --dir: envelope sender and
recipients, the headers the tests check, and the decoded plain-text body.
Prints "listening PORT" once the socket is bound (port 0 picks a free one).

Options: --auth USER:PASS requires AUTH; --tls-ca-out PATH makes a CA and a
certificate for 127.0.0.1 (trustme), writes the CA's PEM there and requires
STARTTLS; --reject SUBSTR answers 550 to recipients containing SUBSTR, --defer
SUBSTR 451.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import uuid

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Sink:
    def __init__(self, out_dir, reject, defer):
        self.out_dir = out_dir
        self.reject = reject
        self.defer = defer

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reject and self.reject in address:
            return "550 5.1.1 <%s>: mailbox unavailable" % address
        if self.defer and self.defer in address:
            return "451 4.3.0 <%s>: try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "from": str(msg["From"]),
            "to": str(msg["To"]),
            "subject": str(msg["Subject"]),
            "message_id": str(msg["Message-ID"]),
            "auto_submitted": str(msg["Auto-Submitted"]),
            "body": body.get_content().replace("\r\n", "\n") if body is not None else "",
            "tls": session.ssl is not None,
            "authenticated": bool(session.authenticated),
        }
        name = uuid.uuid4().hex
        tmp = os.path.join(self.out_dir, "." + name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        # The test sees a message only once it is whole.
        os.rename(tmp, os.path.join(self.out_dir, name + ".json"))
        return "250 2.0.0 Message accepted for delivery"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--auth")
    ap.add_argument("--tls-ca-out")
    ap.add_argument("--reject")
    ap.add_argument("--defer")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    tls_context = None
    if args.tls_ca_out:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(tls_context)
        ca.cert_pem.write_to_path(args.tls_ca_out)

    authenticator = None
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login == user.encode()
                and auth_data.password == password.encode()
            )
            return AuthResult(success=ok, handled=False)

    handler = Sink(args.dir, args.reject, args.defer)

    def factory():
        return SMTP(
            handler,
            hostname="sink.test",
            tls_context=tls_context,
            require_starttls=tls_context is not None,
            authenticator=authenticator,
            auth_required=authenticator is not None,
            auth_require_tls=tls_context is not None,
        )

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", args.port, reuse_address=True)
        print("listening %d" % server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
