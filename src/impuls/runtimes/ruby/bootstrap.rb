# frozen_string_literal: true

# Impuls runtime client for Ruby: speaks the Lambda Runtime API (2018-06-01).
#
# The host starts this file as `ruby bootstrap.rb` with cwd = LAMBDA_TASK_ROOT.  It loads the
# handler named by `_HANDLER` once -- `file.method` (a top-level `def method(event:, context:)`
# in `file.rb`) or `file.Module::Class.method` (a class-level method), as on Lambda -- then
# loops: GET .../invocation/next, call the handler with the keyword arguments `event:` and
# `context:`, POST the result as JSON (or the error document) back, over one persistent
# HTTP/1.1 connection (TCP with TCP_NODELAY to AWS_LAMBDA_RUNTIME_API, or the unix socket named
# by IMPULS_RUNTIME_API_SOCKET, removed from the environment before user code loads).  Each
# request goes out in one write.  Gems vendored in the package under
# `vendor/bundle/ruby/<version>/gems/*/lib` are put on the load path; nothing is installed.

require "socket"
require "json"

module ImpulsRuntime
  RUNTIME = "/2018-06-01/runtime"

  # A minimal keep-alive HTTP/1.1 client for the Runtime API; reconnects when dropped.
  class Connection
    def initialize(api, unix_path)
      @api = api
      @unix_path = unix_path
      @host = unix_path ? "localhost" : api
      @sock = nil
      @buf = String.new
    end

    attr_reader :host

    def request(data)
      attempt = 0
      begin
        sock = @sock || connect
        sock.write(data)
        read_response(sock)
      rescue SystemCallError, IOError, EOFError
        close
        attempt += 1
        raise if attempt > 3

        sleep(0.02 * (attempt - 1)) # first retry at once: a dropped keep-alive
        retry
      end
    end

    def post(path, body, extra_headers = "")
      status, = request("POST #{path} HTTP/1.1\r\nHost: #{@host}\r\nContent-Type: application/json\r\n" \
                        "Content-Length: #{body.bytesize}\r\n#{extra_headers}\r\n#{body}")
      ImpulsRuntime.log("impuls runtime: POST #{path} answered HTTP #{status}\n") unless (200..299).cover?(status)
      status
    end

    private

    def connect
      if @unix_path
        @sock = UNIXSocket.new(@unix_path)
      else
        host, _, port = @api.rpartition(":")
        host = host[1..-2] if host.start_with?("[")
        @sock = TCPSocket.new(host, Integer(port))
        @sock.setsockopt(Socket::IPPROTO_TCP, Socket::TCP_NODELAY, 1)
      end
      @sock.binmode
      @buf = String.new
      @sock
    end

    def close
      @sock&.close
    rescue IOError
      nil
    ensure
      @sock = nil
      @buf = String.new
    end

    def fill(sock)
      chunk = sock.readpartial(65_536)
      @buf << chunk
    end

    def read_response(sock)
      fill(sock) until (ending = @buf.index("\r\n\r\n"))
      lines = @buf[0, ending].split("\r\n")
      @buf = @buf[(ending + 4)..]
      status = lines.first.split(" ", 3)[1].to_i
      headers = {}
      lines.drop(1).each do |line|
        name, value = line.split(":", 2)
        headers[name.strip.downcase] = value.to_s.strip
      end
      body = if headers.key?("content-length")
               length = headers["content-length"].to_i
               fill(sock) while @buf.bytesize < length
               take(length)
             elsif headers["transfer-encoding"].to_s.downcase.include?("chunked")
               read_chunked(sock)
             else
               String.new
             end
      close if headers["connection"].to_s.downcase == "close"
      [status, headers, body]
    end

    def take(length)
      data = @buf.byteslice(0, length)
      @buf = @buf.byteslice(length..) || String.new
      data
    end

    def read_line(sock)
      fill(sock) until (eol = @buf.index("\r\n"))
      line = take(eol)
      take(2)
      line
    end

    def read_chunked(sock)
      body = String.new
      loop do
        size = read_line(sock).split(";", 2).first.to_i(16)
        if size.zero?
          nil until read_line(sock).empty? # trailers, up to the empty line
          return body
        end
        fill(sock) while @buf.bytesize < size + 2
        body << take(size)
        take(2)
      end
    end
  end

  # The `context:` argument, with the fields and methods of Lambda's Ruby context.
  class LambdaContext
    attr_reader :aws_request_id, :invoked_function_arn, :log_group_name, :log_stream_name,
                :function_name, :memory_limit_in_mb, :function_version, :identity,
                :client_context, :deadline_ms

    def initialize(request_id:, deadline_ms:, arn:, identity: nil, client_context: nil)
      @aws_request_id = request_id
      @deadline_ms = deadline_ms
      @invoked_function_arn = arn
      @identity = identity
      @client_context = client_context
      @function_name = ENV.fetch("AWS_LAMBDA_FUNCTION_NAME", "")
      @function_version = ENV.fetch("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
      @memory_limit_in_mb = ENV.fetch("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
      @log_group_name = ENV.fetch("AWS_LAMBDA_LOG_GROUP_NAME", "")
      @log_stream_name = ENV.fetch("AWS_LAMBDA_LOG_STREAM_NAME", "")
    end

    def get_remaining_time_in_millis # rubocop:disable Naming/AccessorMethodName -- Lambda's name
      [@deadline_ms - (Process.clock_gettime(Process::CLOCK_REALTIME, :millisecond)), 0].max
    end
  end

  # An error reported with its own type (the Runtime.* errors).
  class Fault < StandardError
    attr_reader :error_type, :trace

    def initialize(error_type, message, trace = [])
      super(message)
      @error_type = error_type
      @trace = trace
    end
  end

  module_function

  def log(text)
    $stderr.write(text)
    $stderr.flush
  rescue StandardError
    nil
  end

  def flush
    [$stdout, $stderr].each do |stream|
      stream.flush
    rescue StandardError
      nil
    end
  end

  # [body, extra headers] of an error document for `exc`, logged as Lambda's Ruby runtime does
  def error_request(exc)
    type = exc.is_a?(Fault) ? exc.error_type : exc.class.name.to_s
    trace = exc.is_a?(Fault) ? exc.trace : (exc.backtrace || []).reject { |l| l.start_with?(__FILE__) }
    message = exc.message.to_s
    log("[ERROR] #{type}: #{message}\n#{trace.join("\n")}\n")
    doc = { errorMessage: message, errorType: type, stackTrace: trace }
    body = begin
      JSON.generate(doc)
    rescue StandardError
      JSON.generate({ errorMessage: message.scrub("?"), errorType: type, stackTrace: [] })
    end
    [body, "Lambda-Runtime-Function-Error-Type: #{type.delete("\r\n")}\r\n"]
  end

  def add_vendored_gems(task_root)
    version = RbConfig::CONFIG["ruby_version"]
    Dir.glob(File.join(task_root, "vendor", "bundle", "ruby", version, "gems", "*", "lib")).sort.each do |lib|
      $LOAD_PATH.push(lib)
    end
  end

  # The handler as a callable taking (event, context); raises Fault for Lambda's init errors.
  def load_handler(spec, task_root)
    parts = spec.split(".")
    unless [2, 3].include?(parts.size) && parts.none?(&:empty?)
      raise Fault.new("Runtime.MalformedHandlerName",
                      "Bad handler '#{spec}': must be FILE.METHOD or FILE.CLASS.METHOD")
    end
    file = parts.first
    method_name = parts.last.to_sym
    begin
      require File.join(task_root, file)
    rescue SyntaxError => e
      raise Fault.new("Runtime.UserCodeSyntaxError", "Syntax error in '#{file}.rb': #{e.message}",
                      e.message.lines.map(&:chomp))
    rescue LoadError => e
      raise Fault.new("Runtime.ImportModuleError", "Unable to load '#{file}.rb': #{e.message}")
    end
    if parts.size == 2
      receiver = TOPLEVEL_BINDING.receiver
      unless Object.private_method_defined?(method_name) || Object.method_defined?(method_name)
        raise Fault.new("Runtime.HandlerNotFound", "Handler '#{method_name}' missing in '#{file}.rb'")
      end
    else
      begin
        receiver = Object.const_get(parts[1])
      rescue NameError
        raise Fault.new("Runtime.HandlerNotFound", "Handler class '#{parts[1]}' missing in '#{file}.rb'")
      end
      unless receiver.respond_to?(method_name)
        raise Fault.new("Runtime.HandlerNotFound", "Handler '#{parts[1]}.#{method_name}' missing in '#{file}.rb'")
      end
    end
    ->(event, context) { receiver.__send__(method_name, event: event, context: context) }
  end

  def serve(conn, handler)
    next_request = "GET #{RUNTIME}/invocation/next HTTP/1.1\r\nHost: #{conn.host}\r\n\r\n"
    loop do
      status, headers, body = conn.request(next_request)
      unless status == 200
        log("impuls runtime: GET /invocation/next answered HTTP #{status}, exiting\n")
        exit(1)
      end
      request_id = headers.fetch("lambda-runtime-aws-request-id", "")
      trace_id = headers["lambda-runtime-trace-id"]
      trace_id ? ENV["_X_AMZN_TRACE_ID"] = trace_id : ENV.delete("_X_AMZN_TRACE_ID")
      path = "#{RUNTIME}/invocation/#{request_id}"
      begin
        identity = headers["lambda-runtime-cognito-identity"]
        client_context = headers["lambda-runtime-client-context"]
        context = LambdaContext.new(
          request_id: request_id, deadline_ms: headers.fetch("lambda-runtime-deadline-ms", "0").to_i,
          arn: headers.fetch("lambda-runtime-invoked-function-arn", ""),
          identity: identity && JSON.parse(identity), client_context: client_context && JSON.parse(client_context)
        )
        event = begin
          JSON.parse(body.force_encoding(Encoding::UTF_8))
        rescue JSON::ParserError => e
          raise Fault.new("Runtime.UnmarshalError", "Unable to unmarshal input: #{e.message}")
        end
        result = handler.call(event, context)
        payload = begin
          JSON.generate(result)
        rescue StandardError => e
          raise Fault.new("Runtime.MarshalError", "Unable to marshal response: #{e.message}")
        end
      rescue Exception => e # rubocop:disable Lint/RescueException -- every failure is reported
        error_body, error_headers = error_request(e)
        flush
        conn.post("#{path}/error", error_body, error_headers)
        raise unless e.is_a?(StandardError) || e.is_a?(ScriptError) || e.is_a?(NoMemoryError)

        next
      end
      flush
      conn.post("#{path}/response", payload)
    end
  end

  def main
    $stdout.sync = true # stdout is a pipe: block buffered by default
    $stderr.sync = true
    unix_path = ENV.delete("IMPULS_RUNTIME_API_SOCKET")
    unix_path = nil if unix_path&.empty?
    api = ENV.fetch("AWS_LAMBDA_RUNTIME_API", "")
    if api.empty? && unix_path.nil?
      log("impuls runtime: AWS_LAMBDA_RUNTIME_API is not set\n")
      exit(1)
    end
    task_root = ENV["LAMBDA_TASK_ROOT"] || Dir.pwd
    $LOAD_PATH.unshift(task_root)
    add_vendored_gems(task_root)
    conn = Connection.new(api, unix_path)
    begin
      handler = load_handler(ENV.fetch("_HANDLER", ""), task_root)
    rescue Exception => e # rubocop:disable Lint/RescueException -- top-level code may raise anything
      error_body, error_headers = error_request(e)
      flush
      conn.post("#{RUNTIME}/init/error", error_body, error_headers)
      exit(1)
    end
    serve(conn, handler)
  end
end

ImpulsRuntime.main if $PROGRAM_NAME == __FILE__
