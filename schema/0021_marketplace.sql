-- depends: 0020_plugins
-- Marketplace: listings of plugins and workflow templates, reviews with a rating aggregate
-- kept in the same transaction, a purchase/refund ledger, and payouts per publisher and
-- period.
--
-- Tenancy. A listing belongs to its seller (org_id); a review is stored in the listing's
-- organization (org_id = the seller, reviewer_org_id = the reviewer's), so "one review per
-- user per listing" is the tenant-led key (org_id, listing_id, user_id). A purchase belongs to
-- the buyer (org_id) and names the seller. Payouts belong to the seller. Cross-tenant reads
-- (the catalog, reviews of a listing) and cross-tenant writes (reviewing, buying, refunding)
-- go through SECURITY DEFINER functions that take the actor from the context and every
-- price from the listing; the tables' policies stay tenant-only.
--
-- Ratings: an AFTER trigger on marketplace_reviews adds the change (new minus old rating)
-- to the listing's rating_sum / rating_count in the same transaction. Concurrent reviews of
-- one listing serialize on the listing row's lock, so the aggregate stays exact without
-- rescanning reviews.
--
-- Payouts: marketplace_payout_run (dl.system()) sums each seller's ledger rows of a period
-- (purchases minus refunds, per currency), takes the platform's share, and inserts one row
-- per (seller, period, currency) with ON CONFLICT DO NOTHING: running it twice pays once.

CREATE TABLE marketplace_listings (
  org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id            uuid NOT NULL,
  kind          text NOT NULL CONSTRAINT marketplace_listings_kind_known
                CHECK (kind IN ('plugin', 'workflow_template')),
  plugin_id     uuid,
  workflow_id   uuid,
  title         text NOT NULL CONSTRAINT marketplace_listings_title_length
                CHECK (length(title) BETWEEN 1 AND 200),
  summary       text NOT NULL DEFAULT '' CONSTRAINT marketplace_listings_summary_length
                CHECK (length(summary) <= 2000),
  categories    text[] NOT NULL DEFAULT '{}' CONSTRAINT marketplace_listings_categories_size
                CHECK (cardinality(categories) <= 8),
  pricing       text NOT NULL DEFAULT 'free' CONSTRAINT marketplace_listings_pricing_known
                CHECK (pricing IN ('free', 'paid')),
  price         numeric(12, 2) NOT NULL DEFAULT 0,
  currency      text NOT NULL DEFAULT 'USD' CONSTRAINT marketplace_listings_currency_format
                CHECK (currency ~ '^[A-Z]{3}$'),
  featured      boolean NOT NULL DEFAULT false,
  status        text NOT NULL DEFAULT 'listed' CONSTRAINT marketplace_listings_status_known
                CHECK (status IN ('draft', 'listed', 'delisted')),
  rating_sum    bigint NOT NULL DEFAULT 0,
  rating_count  bigint NOT NULL DEFAULT 0,
  search        tsvector GENERATED ALWAYS AS (
                  app.plugin_search_vector(title, '', summary, '', '{}', categories)) STORED,
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT marketplace_listings_subject CHECK (
    (kind = 'plugin' AND plugin_id IS NOT NULL AND workflow_id IS NULL)
    OR (kind = 'workflow_template' AND workflow_id IS NOT NULL AND plugin_id IS NULL)),
  CONSTRAINT marketplace_listings_price CHECK (
    (pricing = 'free' AND price = 0) OR (pricing = 'paid' AND price > 0)),
  CONSTRAINT marketplace_listings_rating CHECK (rating_count >= 0
                                                AND rating_sum BETWEEN rating_count
                                                                   AND 5 * rating_count),
  FOREIGN KEY (org_id, plugin_id) REFERENCES plugins (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE
);
CREATE INDEX marketplace_listings_id_idx ON marketplace_listings (id);
CREATE INDEX marketplace_listings_plugin_idx ON marketplace_listings (org_id, plugin_id);
CREATE INDEX marketplace_listings_search_idx ON marketplace_listings USING gin (search)
  WHERE status = 'listed';
CREATE INDEX marketplace_listings_featured_idx ON marketplace_listings (featured DESC,
                                                                       rating_count DESC, id)
  WHERE status = 'listed';
CREATE TRIGGER marketplace_listings_touch BEFORE UPDATE ON marketplace_listings
  FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE marketplace_reviews (
  org_id           uuid NOT NULL,
  listing_id       uuid NOT NULL,
  user_id          uuid NOT NULL,
  reviewer_org_id  uuid NOT NULL,
  rating           smallint NOT NULL CONSTRAINT marketplace_reviews_rating_range
                   CHECK (rating BETWEEN 1 AND 5),
  body             text NOT NULL DEFAULT '' CONSTRAINT marketplace_reviews_body_length
                   CHECK (length(body) <= 10000),
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, listing_id, user_id),
  FOREIGN KEY (org_id, listing_id) REFERENCES marketplace_listings (org_id, id)
    ON DELETE CASCADE
);

CREATE TABLE marketplace_purchases (
  org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id             uuid NOT NULL DEFAULT gen_random_uuid(),
  listing_id     uuid NOT NULL,
  seller_org_id  uuid NOT NULL,
  kind           text NOT NULL CONSTRAINT marketplace_purchases_kind_known
                 CHECK (kind IN ('purchase', 'refund')),
  amount         numeric(12, 2) NOT NULL CONSTRAINT marketplace_purchases_amount_positive
                 CHECK (amount > 0),
  currency       text NOT NULL CONSTRAINT marketplace_purchases_currency_format
                 CHECK (currency ~ '^[A-Z]{3}$'),
  refund_of      uuid,
  bought_by      uuid DEFAULT app.user_id(),
  created_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT marketplace_purchases_refund_once UNIQUE (org_id, refund_of),
  CONSTRAINT marketplace_purchases_refund_link CHECK ((kind = 'refund') = (refund_of IS NOT NULL)),
  FOREIGN KEY (org_id, refund_of) REFERENCES marketplace_purchases (org_id, id)
);
-- Payout runs read the ledger by seller and time.
CREATE INDEX marketplace_purchases_seller_idx
  ON marketplace_purchases (seller_org_id, created_at);

CREATE TABLE marketplace_payouts (
  org_id          uuid NOT NULL,
  id              uuid NOT NULL DEFAULT gen_random_uuid(),
  period_start    date NOT NULL,
  period_end      date NOT NULL,
  currency        text NOT NULL,
  gross           numeric(14, 2) NOT NULL,
  refunds         numeric(14, 2) NOT NULL,
  platform_share  numeric(5, 4) NOT NULL CONSTRAINT marketplace_payouts_share_range
                  CHECK (platform_share BETWEEN 0 AND 1),
  platform_fee    numeric(14, 2) NOT NULL,
  net             numeric(14, 2) NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT marketplace_payouts_once UNIQUE (org_id, period_start, period_end, currency),
  CONSTRAINT marketplace_payouts_period CHECK (period_end > period_start),
  CONSTRAINT marketplace_payouts_sum CHECK (net = gross - refunds - platform_fee)
);

-- Reviews keep the listing's aggregate exact, in the same transaction.
CREATE FUNCTION app.marketplace_reviews_aggregate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    UPDATE marketplace_listings SET rating_sum = rating_sum + NEW.rating,
                                    rating_count = rating_count + 1
    WHERE org_id = NEW.org_id AND id = NEW.listing_id;
  ELSIF TG_OP = 'UPDATE' THEN
    UPDATE marketplace_listings SET rating_sum = rating_sum + NEW.rating - OLD.rating
    WHERE org_id = NEW.org_id AND id = NEW.listing_id;
  ELSE
    UPDATE marketplace_listings SET rating_sum = rating_sum - OLD.rating,
                                    rating_count = rating_count - 1
    WHERE org_id = OLD.org_id AND id = OLD.listing_id;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER marketplace_reviews_aggregate AFTER INSERT OR DELETE OR UPDATE OF rating
  ON marketplace_reviews FOR EACH ROW EXECUTE FUNCTION app.marketplace_reviews_aggregate();

-- Is a listing visible to the context: listed (any organization) or its own.
-- Search: listed listings (and the context's own), ranked, filtered, keyset on (rank, id).
CREATE FUNCTION app.marketplace_search(p_query text, p_kind text, p_category text,
                                       p_featured boolean, p_after_rank real, p_after_id uuid,
                                       p_limit integer)
RETURNS TABLE (org_id uuid, id uuid, kind text, plugin_id uuid, workflow_id uuid, title text,
               summary text, categories text[], pricing text, price numeric, currency text,
               featured boolean, status text, rating_sum bigint, rating_count bigint,
               rank real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  WITH q AS (
    SELECT CASE WHEN coalesce(p_query, '') = '' THEN NULL
                ELSE websearch_to_tsquery('simple', p_query)
                     || websearch_to_tsquery('english', p_query) END AS q
  ), hits AS (
    SELECT l.*, CASE WHEN q.q IS NULL
                     THEN (l.featured::int * 10 + l.rating_sum::real / greatest(l.rating_count, 1))::real
                     ELSE ts_rank_cd(l.search, q.q) END AS r
    FROM marketplace_listings l, q
    WHERE app.org_id() IS NOT NULL
      AND (l.status = 'listed' OR l.org_id = app.org_id())
      AND (q.q IS NULL OR l.search @@ q.q)
      AND (p_kind IS NULL OR l.kind = p_kind)
      AND (p_category IS NULL OR l.categories @> ARRAY[p_category])
      AND (p_featured IS NULL OR l.featured = p_featured)
  )
  SELECT h.org_id, h.id, h.kind, h.plugin_id, h.workflow_id, h.title, h.summary,
         h.categories, h.pricing, h.price, h.currency, h.featured, h.status, h.rating_sum,
         h.rating_count, h.r
  FROM hits h
  WHERE p_after_id IS NULL OR h.r < p_after_rank OR (h.r = p_after_rank AND h.id > p_after_id)
  ORDER BY h.r DESC, h.id
  LIMIT least(greatest(p_limit, 1), 100)
$$;

-- Write or edit the context user's review of a visible listing (one per user and listing).
CREATE FUNCTION app.marketplace_review(p_listing uuid, p_rating integer, p_body text)
RETURNS TABLE (listing_id uuid, user_id uuid, rating smallint, body text,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  l marketplace_listings;
BEGIN
  IF app.org_id() IS NULL OR app.user_id() IS NULL OR app.read_only()
     OR app.role() IS NULL OR app.role() = 'guest' THEN
    RAISE EXCEPTION 'reviewing needs a signed-in member of an organization'
      USING ERRCODE = '42501';
  END IF;
  SELECT * INTO l FROM marketplace_listings x
  WHERE x.id = p_listing AND (x.status = 'listed' OR x.org_id = app.org_id());
  IF NOT FOUND THEN
    RETURN;  -- no row: not found (or not visible)
  END IF;
  RETURN QUERY
  INSERT INTO marketplace_reviews AS r (org_id, listing_id, user_id, reviewer_org_id, rating,
                                        body)
  VALUES (l.org_id, l.id, app.user_id(), app.org_id(), p_rating, coalesce(p_body, ''))
  ON CONFLICT ON CONSTRAINT marketplace_reviews_pkey DO UPDATE
  SET rating = EXCLUDED.rating, body = EXCLUDED.body, updated_at = now()
  RETURNING r.listing_id, r.user_id, r.rating, r.body, r.created_at, r.updated_at;
END $$;

-- Reviews of a visible listing, newest first, keyset on (updated_at, user_id).
CREATE FUNCTION app.marketplace_reviews_of(p_listing uuid, p_before timestamptz,
                                           p_before_user uuid, p_limit integer)
RETURNS TABLE (listing_id uuid, user_id uuid, rating smallint, body text,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT r.listing_id, r.user_id, r.rating, r.body, r.created_at, r.updated_at
  FROM marketplace_reviews r JOIN marketplace_listings l
    ON l.org_id = r.org_id AND l.id = r.listing_id
  WHERE r.listing_id = p_listing AND app.org_id() IS NOT NULL
    AND (l.status = 'listed' OR l.org_id = app.org_id())
    AND (r.updated_at, r.user_id) < (p_before, p_before_user)
  ORDER BY r.updated_at DESC, r.user_id DESC
  LIMIT least(greatest(p_limit, 1), 100)
$$;

-- Buy a listed paid listing for the context organization at the listing's price.
CREATE FUNCTION app.marketplace_buy(p_listing uuid)
RETURNS TABLE (id uuid, listing_id uuid, seller_org_id uuid, kind text, amount numeric,
               currency text, refund_of uuid, created_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  l marketplace_listings;
BEGIN
  IF NOT app.is_admin() THEN
    RAISE EXCEPTION 'buying needs an owner or admin of the organization'
      USING ERRCODE = '42501';
  END IF;
  SELECT * INTO l FROM marketplace_listings x
  WHERE x.id = p_listing AND x.status = 'listed' AND x.pricing = 'paid';
  IF NOT FOUND THEN
    RETURN;  -- no row: not found, not listed or free
  END IF;
  RETURN QUERY
  INSERT INTO marketplace_purchases AS p (org_id, listing_id, seller_org_id, kind, amount,
                                          currency)
  VALUES (app.org_id(), l.id, l.org_id, 'purchase', l.price, l.currency)
  RETURNING p.id, p.listing_id, p.seller_org_id, p.kind, p.amount, p.currency, p.refund_of,
            p.created_at;
END $$;

-- Refund an own purchase in full (once).
CREATE FUNCTION app.marketplace_refund(p_purchase uuid)
RETURNS TABLE (id uuid, listing_id uuid, seller_org_id uuid, kind text, amount numeric,
               currency text, refund_of uuid, created_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NOT app.is_admin() THEN
    RAISE EXCEPTION 'refunds need an owner or admin of the organization'
      USING ERRCODE = '42501';
  END IF;
  RETURN QUERY
  INSERT INTO marketplace_purchases AS p (org_id, listing_id, seller_org_id, kind, amount,
                                          currency, refund_of)
  SELECT b.org_id, b.listing_id, b.seller_org_id, 'refund', b.amount, b.currency, b.id
  FROM marketplace_purchases b
  WHERE b.org_id = app.org_id() AND b.id = p_purchase AND b.kind = 'purchase'
  RETURNING p.id, p.listing_id, p.seller_org_id, p.kind, p.amount, p.currency, p.refund_of,
            p.created_at;
END $$;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.marketplace_reviews_aggregate()',
    'app.marketplace_search(text, text, text, boolean, real, uuid, integer)',
    'app.marketplace_review(uuid, integer, text)',
    'app.marketplace_reviews_of(uuid, timestamptz, uuid, integer)',
    'app.marketplace_buy(uuid)', 'app.marketplace_refund(uuid)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app, datalayer_maint', f);
  END LOOP;
END $$;

ALTER TABLE marketplace_listings ENABLE ROW LEVEL SECURITY;
ALTER TABLE marketplace_listings FORCE ROW LEVEL SECURITY;
ALTER TABLE marketplace_reviews ENABLE ROW LEVEL SECURITY;
ALTER TABLE marketplace_reviews FORCE ROW LEVEL SECURITY;
ALTER TABLE marketplace_purchases ENABLE ROW LEVEL SECURITY;
ALTER TABLE marketplace_purchases FORCE ROW LEVEL SECURITY;
ALTER TABLE marketplace_payouts ENABLE ROW LEVEL SECURITY;
ALTER TABLE marketplace_payouts FORCE ROW LEVEL SECURITY;

CREATE POLICY marketplace_listings_select ON marketplace_listings FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY marketplace_listings_insert ON marketplace_listings FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));
CREATE POLICY marketplace_listings_update ON marketplace_listings FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()))
  WITH CHECK (org_id = (SELECT app.org_id()));
CREATE POLICY marketplace_listings_delete ON marketplace_listings FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));
-- Sellers read the reviews of their listings; writes only through app.marketplace_review.
CREATE POLICY marketplace_reviews_select ON marketplace_reviews FOR SELECT
  USING (org_id = (SELECT app.org_id()));
-- Buyers read their ledger; writes only through app.marketplace_buy / _refund.
CREATE POLICY marketplace_purchases_select ON marketplace_purchases FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY marketplace_payouts_select ON marketplace_payouts FOR SELECT
  USING (org_id = (SELECT app.org_id()));

-- `featured` and the rating aggregate are not the seller's to set.
GRANT SELECT,
      INSERT (org_id, id, kind, plugin_id, workflow_id, title, summary, categories, pricing,
              price, currency, status),
      UPDATE (title, summary, categories, pricing, price, currency, status),
      DELETE
  ON marketplace_listings TO datalayer_app;
GRANT SELECT ON marketplace_reviews, marketplace_purchases, marketplace_payouts
  TO datalayer_app;
