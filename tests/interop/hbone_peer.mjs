// An HBONE peer built on Node.js's own HTTP/2 stack, to check our implementation against an independent one.
//   node hbone_peer.mjs server <certdir>                      -> prints {"port": N}, echoes every CONNECT stream
//   node hbone_peer.mjs client <certdir> <port> <authority> <bytes> <expected-spiffe>
//                                                            -> sends <bytes> random bytes, prints hashes
import http2 from 'node:http2';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

const [mode, certdir, ...rest] = process.argv.slice(2);
const tls = {
  key: fs.readFileSync(path.join(certdir, 'key.pem')),
  cert: fs.readFileSync(path.join(certdir, 'cert-chain.pem')),
  ca: fs.readFileSync(path.join(certdir, 'root-cert.pem')),
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
};
const settings = { initialWindowSize: 4 * 1024 * 1024, maxFrameSize: 1024 * 1024 };

if (mode === 'server') {
  const server = http2.createSecureServer({ ...tls, requestCert: true, rejectUnauthorized: true, settings });
  server.on('stream', (stream, headers) => {
    if (headers[':method'] !== 'CONNECT') {
      stream.respond({ ':status': 400 }, { endStream: true });
      return;
    }
    stream.respond({ ':status': 200, baggage: 'k8s.cluster.name=node' });
    stream.pipe(stream); // echo, ending our side when the client ends its side
  });
  server.listen(0, '127.0.0.1', () => console.log(JSON.stringify({ port: server.address().port })));
} else if (mode === 'client') {
  const [port, authority, bytes, expected] = rest;
  const session = http2.connect(`https://127.0.0.1:${port}`, {
    ...tls,
    settings,
    servername: '',
    // HBONE checks the SPIFFE URI SAN, not a hostname.
    checkServerIdentity: (_host, cert) =>
      (cert.subjectaltname || '').split(', ').includes(`URI:${expected}`)
        ? undefined
        : new Error(`server identity ${cert.subjectaltname} is not ${expected}`),
  });
  session.on('error', (err) => { console.error(String(err)); process.exit(2); });
  const req = session.request({ ':method': 'CONNECT', ':authority': authority }, { endStream: false });
  const sent = crypto.createHash('sha256');
  const recv = crypto.createHash('sha256');
  let received = 0;
  req.on('response', (headers) => {
    if (headers[':status'] !== 200) { console.error(`status ${headers[':status']}`); process.exit(3); }
    let left = Number(bytes);
    const pump = () => {
      while (left > 0) {
        const chunk = crypto.randomBytes(Math.min(left, 65536 + Math.floor(Math.random() * 65536)));
        left -= chunk.length;
        sent.update(chunk);
        if (!req.write(chunk)) { req.once('drain', pump); return; }
      }
      req.end();
    };
    pump();
  });
  req.on('data', (d) => { recv.update(d); received += d.length; });
  req.on('end', () => {
    console.log(JSON.stringify({ sent: sent.digest('hex'), received: recv.digest('hex'), bytes: received }));
    session.close();
  });
  req.on('error', (err) => { console.error(String(err)); process.exit(4); });
}
