package impuls.runtime;

import java.io.BufferedInputStream;
import java.io.ByteArrayOutputStream;
import java.io.EOFException;
import java.io.IOException;
import java.io.InputStream;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.net.StandardProtocolFamily;
import java.net.StandardSocketOptions;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.Channels;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.util.Locale;
import java.util.Map;
import java.util.TreeMap;

/**
 * HTTP/1.1 to the Runtime API over one keep-alive connection: the unix socket when one is given
 * (the namespace sandbox), else TCP to {@code host:port} with TCP_NODELAY.  Each request (headers
 * and body) goes out in one write.
 */
final class RuntimeApi {
    /** A response: status, headers (lower-case names) and body. */
    static final class Response {
        final int status;
        final Map<String, String> headers;
        final byte[] body;

        Response(int status, Map<String, String> headers, byte[] body) {
            this.status = status;
            this.headers = headers;
            this.body = body;
        }

        String header(String name) {
            return headers.get(name.toLowerCase(Locale.ROOT));
        }
    }

    private final SocketAddress address;
    private final String host;
    private SocketChannel channel;
    private InputStream in;

    RuntimeApi(String socketPath, String hostPort) {
        if (socketPath != null && !socketPath.isEmpty()) {
            this.address = UnixDomainSocketAddress.of(socketPath);
            this.host = "localhost";
        } else {
            if (hostPort == null || hostPort.isEmpty()) {
                throw new IllegalStateException("AWS_LAMBDA_RUNTIME_API is not set");
            }
            int colon = hostPort.lastIndexOf(':');
            this.address = new InetSocketAddress(hostPort.substring(0, colon),
                    Integer.parseInt(hostPort.substring(colon + 1)));
            this.host = hostPort;
        }
    }

    private void connect() throws IOException {
        if (address instanceof UnixDomainSocketAddress) {
            channel = SocketChannel.open(StandardProtocolFamily.UNIX);
        } else {
            channel = SocketChannel.open();
            channel.setOption(StandardSocketOptions.TCP_NODELAY, true);
        }
        channel.connect(address);
        in = new BufferedInputStream(Channels.newInputStream(channel), 65536);
    }

    private void close() {
        try {
            if (channel != null) {
                channel.close();
            }
        } catch (IOException ignored) {
            // closing a broken connection
        }
        channel = null;
        in = null;
    }

    Response request(String method, String path, Map<String, String> headers, byte[] body)
            throws IOException {
        if (channel == null) {
            connect();
        }
        StringBuilder head = new StringBuilder(256);
        head.append(method).append(' ').append(path).append(" HTTP/1.1\r\nHost: ").append(host).append("\r\n");
        for (Map.Entry<String, String> entry : headers.entrySet()) {
            head.append(entry.getKey()).append(": ").append(entry.getValue()).append("\r\n");
        }
        if (body != null) {
            head.append("Content-Type: application/json\r\nContent-Length: ").append(body.length).append("\r\n");
        }
        head.append("\r\n");
        byte[] headBytes = head.toString().getBytes(StandardCharsets.ISO_8859_1);
        int bodyLength = body == null ? 0 : body.length;
        ByteBuffer out = ByteBuffer.allocate(headBytes.length + bodyLength);
        out.put(headBytes);
        if (body != null) {
            out.put(body);
        }
        out.flip();
        try {
            while (out.hasRemaining()) {
                channel.write(out);
            }
            Response response = read();
            if ("close".equalsIgnoreCase(response.header("connection"))) {
                close();
            }
            return response;
        } catch (IOException e) {
            close();
            throw e;
        }
    }

    private Response read() throws IOException {
        String statusLine = line();
        String[] parts = statusLine.split(" ", 3);
        if (parts.length < 2 || !parts[0].startsWith("HTTP/")) {
            throw new IOException("malformed status line from the Runtime API: " + statusLine);
        }
        int status = Integer.parseInt(parts[1]);
        Map<String, String> headers = new TreeMap<>();
        for (String line = line(); !line.isEmpty(); line = line()) {
            int colon = line.indexOf(':');
            if (colon > 0) {
                headers.put(line.substring(0, colon).trim().toLowerCase(Locale.ROOT), line.substring(colon + 1).trim());
            }
        }
        byte[] body;
        String length = headers.get("content-length");
        if ("chunked".equalsIgnoreCase(headers.get("transfer-encoding"))) {
            ByteArrayOutputStream buffer = new ByteArrayOutputStream();
            for (int size = chunkSize(); size > 0; size = chunkSize()) {
                buffer.write(exactly(size));
                line();
            }
            while (!line().isEmpty()) {
                // trailers: none are used
            }
            body = buffer.toByteArray();
        } else if (length != null) {
            body = exactly(Integer.parseInt(length));
        } else {
            body = new byte[0];
        }
        return new Response(status, headers, body);
    }

    private int chunkSize() throws IOException {
        String line = line();
        int semicolon = line.indexOf(';');
        return Integer.parseInt((semicolon >= 0 ? line.substring(0, semicolon) : line).trim(), 16);
    }

    private byte[] exactly(int n) throws IOException {
        byte[] data = in.readNBytes(n);
        if (data.length != n) {
            throw new EOFException("the Runtime API closed the connection mid-body");
        }
        return data;
    }

    private String line() throws IOException {
        StringBuilder sb = new StringBuilder(64);
        while (true) {
            int c = in.read();
            if (c < 0) {
                throw new EOFException("the Runtime API closed the connection");
            }
            if (c == '\n') {
                int end = sb.length();
                if (end > 0 && sb.charAt(end - 1) == '\r') {
                    sb.setLength(end - 1);
                }
                return sb.toString();
            }
            sb.append((char) c);
        }
    }
}
